"""Validation study v2.2: does memwatch detect memorization, and when — and which onset rule should
be its default?

Small DDPMs (:class:`memwatch.apps.toymodels.DDPMModule`, an MLP ε-network, linear 1000-step
schedule; and a diffusers ``UNet2DModel`` with a default ``DDPMScheduler`` for the image case) are
trained with Lightning on:

* ``digits``: sklearn 8×8 digits in [-1, 1] (``d = 64``), :func:`memwatch.data.digits`, and the
  same images rescaled, ``digits_01`` (to [0, 1]) and ``digits_x3`` (× 3) (:data:`.config.SCALED`);
* ``swiss_roll``, ``s_curve``: standardized 3-D points embedded in ``R^16`` by a random
  orthogonal map, :func:`memwatch.data.manifold`;
* ``gmm``: an isotropic Gaussian mixture in ``R^16`` (8 components, means ``N(0, I)`` fixed,
  component std 0.3), :class:`memwatch.data.GaussianMixture`;
* ``digits16``: the digits upsampled to 16×16 (``d = 256``) for the UNet
  (:data:`.config.IMAGE_SIZES`; its monitors measure on the trace tier);

for several training-set sizes ``N`` (small ones memorize within the step budget, large ones do
not) and several seeds (seed = data subset / embedding, model init, batch order and probe noise).

Three :class:`memwatch.MemorizationMonitor` s watch every run: one with the fixed absolute rule
(:data:`.config.ABSOLUTE_RULE`, the library's former defaults) on its own probes, counting copies
of the training samples it sees (``reference_data="batches"``); one measuring the same probes on
the trace tier; and one with ``sigmas="auto"`` and every ``sigma_factors`` of the study
(calibrated by the monitor itself, no σ set by hand; the library's default factor among them),
whose ``reference_data`` is the training set, so every check has the nearest-neighbour ground
truth of DESIGN.md (a probe is memorized when ``d₁/d₂ < 1/3``). Per-probe
values come from the callbacks themselves (:class:`~.runs.RecordingMonitor`, through the public
``on_check_end`` hook). At every check the ``auto`` monitor also evaluates the ε-objective at fixed
timesteps and noises on training samples and on a held-out split (:class:`memwatch.lossgap.LossGap`,
the class behind the monitor's ``heldout_data``): the loss-gap baseline.

Analysis (pure post-processing of the recorded checks, :mod:`.analysis`):

1. Rules, replayed offline through :class:`memwatch.onset.OnsetDetector`: the fixed absolute
   rule and its trace tier; the library's defaults; the absolute level with tuned thresholds;
   ``sigmas="auto"`` with factor and thresholds tuned; an LID threshold tuned; copies of the
   batches, fixed and tuned; sharp or copy; the loss gap with timestep and threshold tuned.
   Every tuned setting is chosen on the selection seed(s) only (:func:`.analysis.select_rules`).
2. Per run: ground-truth onset (first check with > 10 % copies), kind (memorizing, never > 5 %,
   borderline in between), each rule's onset and lead, right / on time / false alarm; the onset's
   change in checks when the same digits are rescaled.
3. Per probe: AUROC and TPR at 1 % / 5 % FPR of every signal at every noise level, pooled.
4. Report seeds and, from a second cache, fresh seeds trained after every choice was fixed.

Writes ``<out>/validation.md`` and ``<out>/img/validation_*.png`` (default ``docs/``; with
``--fast`` ``memwatch_out/validation-fast/``, so a smoke run never overwrites the published report).

Layout: :mod:`.config` (the study grid, signals, library defaults), :mod:`.runs` (training one run,
:class:`~.runs.RunRecord` / :class:`~.runs.CheckRecord`, the cache), :mod:`.analysis` (pure
functions on records), :mod:`.figures` and :mod:`.report` (one function per figure and per
section of ``validation.md``), :mod:`.cli` (the command line).

Usage::

    python benchmarks/validation.py --train-only --cache runs.pt    # seeds 0, 1 (selection, report)
    python benchmarks/validation.py --seeds 2 --cache fresh.pt      # fresh seed, after the choices are fixed
    python benchmarks/validation.py --from-cache runs.pt --fresh-cache fresh.pt   # the report, docs/
    python benchmarks/validation.py                                 # train seeds 0, 1 and report, docs/
    python benchmarks/validation.py --fast                          # CI smoke size, memwatch_out/
"""
