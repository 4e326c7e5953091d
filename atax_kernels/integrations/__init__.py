"""Framework integrations. Importing this package imports no framework; import the submodule you need
(``atax_kernels.integrations.hf`` for ``transformers.Trainer`` and every TRL trainer)."""
