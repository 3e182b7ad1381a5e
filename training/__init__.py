"""Making small MONET models here: a labelled code-and-prose corpus from files the machine
already has, and the training loop (language-model loss plus MONET's routing losses)."""
