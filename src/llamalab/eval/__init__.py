"""Zero-shot evaluation (the paper's common-sense tasks) and perplexity."""
