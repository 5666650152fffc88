"""Integrations with training frameworks, one module each: ``huggingface`` (the Hugging Face ``Trainer``),
``lightning`` (Lightning's ``Trainer``). Each imports its framework only when imported itself; this
package imports none, so the core never depends on them."""
