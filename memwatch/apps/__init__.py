"""Applications on top of the library: ``memwatch demo``, ``memwatch fit`` (LightningCLI) and
the toy models they train. Nothing in the library core imports from here."""
