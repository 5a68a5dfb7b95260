"""What ``memwatch demo`` runs: two DDPMs on sklearn digits, one memorizing, one not.

    python examples/digits.py              # ~ a few minutes on a CPU
    python examples/digits.py --fast       # < 1 minute
    python examples/digits.py --help       # the same flags as `memwatch demo`

As a template for your own model: memwatch needs one thing from your LightningModule, a
``memwatch_score()`` method returning a :class:`memwatch.DiffusionScore` — your network, the noise
schedule it was trained with, and what it predicts (``"epsilon"``, ``"v_prediction"``,
``"sample"`` or ``"score"``). ``DigitsDDPM`` below is such a module (its training step is
:class:`memwatch.apps.toymodels.DDPMModule`'s plain ε-objective). Then:

    monitor = memwatch.MemorizationMonitor(every_n_train_steps=500)  # defaults: σ_t = 0.3, …
    trainer = pl.Trainer(callbacks=[monitor], logger=WandbLogger(offline=True), ...)
    trainer.fit(model, datamodule)
    monitor.onset_step, monitor.clean_checkpoint_path, monitor.history

:func:`memwatch.apps.demo.fit_digits` is that recipe for one run (read it next);
:func:`memwatch.apps.demo.run_demo` runs it twice and draws the plots.
"""

from __future__ import annotations

import argparse
import sys

import memwatch
from memwatch.apps import demo
from memwatch.apps.toymodels import DDPMModule


class DigitsDDPM(DDPMModule):
    """Stands for your LightningModule: ``training_step`` / ``configure_optimizers`` come from
    :class:`DDPMModule` (an MLP ε-network ``self.net`` on the linear schedule ``self.schedule``)."""

    def memwatch_score(self) -> memwatch.DiffusionScore:
        # the only method memwatch needs: the network, its noise schedule, what it predicts
        return memwatch.DiffusionScore(self.net, self.schedule, prediction="epsilon")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    return demo.main(argv, parser=parser, module_factory=DigitsDDPM)


if __name__ == "__main__":
    sys.exit(main())
