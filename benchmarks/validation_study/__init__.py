"""Validation study (issue #7): does memwatch detect memorization, and when?

Small DDPMs (:class:`memwatch.toymodels.DDPMModule`, an MLP ε-network, linear 1000-step schedule)
are trained with Lightning on embedded data, with :class:`memwatch.MemorizationMonitor` running
throughout (``reference_data`` = the training set, so every check also has the nearest-neighbour
ground truth of DESIGN.md: a probe is memorized when ``d₁/d₂ < 1/3``):

* ``digits``: sklearn 8×8 digits in [-1, 1] (``d = 64``), :func:`memwatch.data.digits`;
* ``swiss_roll``, ``s_curve``: standardized 3-D points embedded in ``R^16`` by a random
  orthogonal map, :func:`memwatch.data.manifold`;
* ``gmm``: an isotropic Gaussian mixture in ``R^16`` (8 components, means ``N(0, I)`` fixed,
  component std 0.3), :class:`memwatch.data.GaussianMixture`;

for several training-set sizes ``N`` (small ones memorize within the step budget, large ones do
not) and several seeds (seed = data subset / embedding, model init, batch order and probe noise).

Per-probe values come from the callback itself: :class:`~.runs.RecordingMonitor` subclasses
``MemorizationMonitor`` and keeps, at every check, the :class:`memwatch.SharpnessResult` of each
evaluation timestep and the probes' ``d₁/d₂`` through the public ``on_check_end`` hook (the
runs have no logger, so no per-check figures are drawn; nothing is measured twice). The callback is
given every evaluation noise level of the study at once: absolute ``σ_t`` and ``σ_t = c · m``
with ``m`` the median nearest-neighbour distance of the training set; its *primary* level is the
shipped default, so its own onset is the "as shipped" column.

Analysis (pure post-processing of the recorded checks):

1. Per-probe AUROC and TPR at 1 % / 5 % FPR of each signal (higher = more memorized: sharp
   fraction, -LID, -σ²λ_min, -mean σ²λ_1..k, -FLIPD and, added here, -σ²λ_max from the spectrum)
   against the NN labels, pooled over all checks and runs of a data set.
2. Selection on the selection seeds only (``StudyConfig.select_seeds``: seed 0): the noise level (per signal, by the
   mean AUROC over data sets), then ``score_threshold`` and ``onset_threshold`` for the sharp
   fraction (the callback's score) by replaying :class:`memwatch.onset.OnsetDetector` (the
   shipped ``patience`` etc.) on the recorded checks: no false alarm on a run that never
   memorizes, then as many runs as possible flagged no later than the ground truth, then the
   widest margin on both sides of ``onset_threshold`` (see :func:`.analysis.choose_thresholds`).
3. Report on the other seeds only: AUROC tables, onset step of memwatch vs the step at which the
   NN ground truth first exceeds 10 % memorized probes (lead = truth - memwatch, positive =
   memwatch earlier), false alarms on runs that never memorize.

Writes ``<out>/validation.md`` and ``<out>/img/validation_*.png`` (default ``docs/``; with
``--fast`` ``memwatch_out/validation-fast/``, so a smoke run never overwrites the published report).

Layout: :mod:`.config` (the study grid, signals, library defaults), :mod:`.runs` (training one run,
:class:`~.runs.RunRecord` / :class:`~.runs.CheckRecord`, the cache), :mod:`.analysis` (pure
functions on records), :mod:`.figures` and :mod:`.report` (one function per figure and per
section of ``validation.md``), :mod:`.cli` (the command line).

Usage::

    python benchmarks/validation.py                      # default size
    python benchmarks/validation.py --fast               # CI smoke size (< 1 min), memwatch_out/
    python benchmarks/validation.py --cache runs.pt      # also save the recorded checks
    python benchmarks/validation.py --from-cache runs.pt # analysis only, no training
"""
