"""StepSaver: the digits pipeline, grouping by predicted count, the fallback, the quality metric.

Tiny random UNets serve the exactness tests (sampling, grouping and reassembly do not need
trained weights); the committed weights serve the quality sanity checks.
"""

import warnings

import pytest
import torch

from dynexec_compile.stepsaver import (
    MODEL_DIR,
    STEP_GRID,
    DigitPrompt,
    DigitQuality,
    DigitsPipeline,
    OutOfDomainWarning,
    QualityReport,
    StepLabels,
    StepPredictor,
    StepSaver,
    frechet_distance,
    load_predictor,
    matches,
    real_digits,
    save_predictor,
)
from dynexec_compile.stepsaver.pipeline import build_unet
from dynexec_compile.stepsaver.predictor import (
    assign_steps,
    induce_labels,
    train_predictor,
)

HAVE_WEIGHTS = (MODEL_DIR / "predictor.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="models/stepsaver-digits not trained")


@pytest.fixture(scope="module")
def tiny() -> DigitsPipeline:
    torch.manual_seed(0)
    return DigitsPipeline(build_unet(block_out_channels=(8, 16)))


def prompts_and_seeds():
    prompts = [DigitPrompt(3, 1.0), DigitPrompt(7, 2.5), DigitPrompt(0, 1.0), DigitPrompt(3, 4.0), DigitPrompt(9, 1.5)]
    return prompts, [11, 5, 42, 11, 3]


class TablePredictor:
    """Step counts from a fixed table, to test grouping independently of any model."""

    def __init__(self, table):
        self.table = table

    def predict(self, prompts):
        return [self.table[p] for p in prompts]


class SpyPipeline:
    def __init__(self, pipeline):
        self.pipeline, self.calls = pipeline, []

    def sample(self, prompts, steps, seeds, batch_size=None):
        self.calls.append((list(prompts), steps, list(seeds)))
        return self.pipeline.sample(prompts, steps, seeds, batch_size=batch_size)


# ---- the pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 7, 50])
def test_sampling_is_deterministic_for_a_seed_at_any_step_count(tiny, steps):
    prompts, seeds = prompts_and_seeds()
    a = tiny.sample(prompts, steps, seeds)
    b = tiny.sample(prompts, steps, seeds)
    assert a.shape == (5, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[3])  # same seed, other guidance: another image
    assert not torch.allclose(tiny.sample(prompts, steps, [s + 1 for s in seeds]), a)


def test_step_count_changes_the_image(tiny):
    prompts, seeds = prompts_and_seeds()
    assert not torch.allclose(tiny.sample(prompts, 2, seeds), tiny.sample(prompts, 20, seeds))


def test_an_image_does_not_depend_on_its_batch(tiny):
    prompts, seeds = prompts_and_seeds()
    batched = tiny.sample(prompts, 4, seeds)
    chunked = tiny.sample(prompts, 4, seeds, batch_size=2)
    alone = torch.cat([tiny.sample([p], 4, [s]) for p, s in zip(prompts, seeds)])
    torch.testing.assert_close(chunked, batched, rtol=0, atol=1e-5)  # fp32 rounding of batched convs
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)


def test_pipeline_save_and_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = DigitsPipeline.from_pretrained(tmp_path)
    prompts, seeds = prompts_and_seeds()
    assert torch.equal(loaded.sample(prompts, 3, seeds), tiny.sample(prompts, 3, seeds))
    with pytest.raises(FileNotFoundError, match="train one with examples/train_stepsaver.py"):
        DigitsPipeline.from_pretrained(tmp_path / "missing")


# ---- grouping by predicted count ----------------------------------------------------------


def test_grouping_calls_the_pipeline_once_per_count_and_keeps_the_order(tiny):
    prompts, seeds = prompts_and_seeds()
    table = {prompts[0]: 5, prompts[1]: 20, prompts[2]: 5, prompts[3]: 8, prompts[4]: 20}
    spy = SpyPipeline(tiny)
    out = StepSaver(spy, TablePredictor(table))(prompts, seeds)
    assert [(steps, ps, ss) for ps, steps, ss in spy.calls] == [
        (5, [prompts[0], prompts[2]], [11, 42]),
        (8, [prompts[3]], [11]),
        (20, [prompts[1], prompts[4]], [5, 3]),
    ]
    assert out.steps == [5, 20, 5, 8, 20]
    assert out.mean_steps == pytest.approx(58 / 5)
    alone = torch.cat([tiny.sample([p], table[p], [s]) for p, s in zip(prompts, seeds)])
    torch.testing.assert_close(out.images, alone, rtol=0, atol=1e-5)


def _table(fn=lambda d, g: 5, scales=(1.0, 2.0, 4.0)):
    return {DigitPrompt(d, g): fn(d, g) for d in range(10) for g in scales}


def test_stepsaver_with_a_table_predictor_uses_its_counts(tiny):
    predictor = StepPredictor(_table(lambda d, g: STEP_GRID[(d + int(g)) % 5]), safe_steps=20)
    prompts, seeds = prompts_and_seeds()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every prompt is in the domain: no warning
        planned = predictor.predict(prompts)
        out = StepSaver(tiny, predictor)(prompts, seeds)
    assert out.steps == planned and len(set(planned)) > 1


def test_out_of_domain_prompts_fall_back_to_the_safe_count_and_say_so(tiny):
    predictor = StepPredictor(_table(), safe_steps=20)
    prompts = [DigitPrompt(1, 2.0), DigitPrompt(4, 7.5), DigitPrompt(2, 0.5)]
    spy = SpyPipeline(tiny)
    with pytest.warns(OutOfDomainWarning, match=r"2 prompt\(s\) outside .*guidance scales 1\.\.4.*safe for the whole training set, 20 steps"):
        out = StepSaver(spy, predictor)(prompts, [0, 1, 2])
    assert out.steps == [5, 20, 20]
    assert any(steps == 20 and DigitPrompt(4, 7.5) in ps for ps, steps, _ in spy.calls)


def test_a_scale_between_trained_ones_takes_the_larger_neighbouring_count():
    # digit 3: 2 steps at guidance 1, 8 at guidance 2, 4 at guidance 4
    predictor = StepPredictor(_table(lambda d, g: {1.0: 2, 2.0: 8, 4.0: 4}[g] if d == 3 else 5), safe_steps=10)
    assert predictor.predict([DigitPrompt(3, g) for g in (1.0, 1.5, 2.0, 3.0, 4.0)]) == [2, 8, 8, 8, 4]
    assert predictor.predict([DigitPrompt(3, 2.0 + 1e-12)]) == [8]
    with pytest.raises(ValueError, match="a count for every digit at every trained guidance scale"):
        StepPredictor({DigitPrompt(0, 1.0): 5}, safe_steps=10)


def test_predictor_save_and_load_round_trip(tmp_path):
    predictor = StepPredictor(_table(lambda d, g: STEP_GRID[(3 * d + int(g)) % 7]), safe_steps=15)
    save_predictor(predictor, tmp_path / "p.safetensors")
    loaded = load_predictor(tmp_path / "p.safetensors")
    prompts, _ = prompts_and_seeds()
    assert loaded.table == predictor.table and loaded.safe_steps == 15
    assert loaded.predict(prompts) == predictor.predict(prompts)
    with pytest.raises(ValueError, match="not a dynexec step predictor"):
        from dynexec_compile.stepsaver.quality import load_classifier
        from dynexec_compile.weights_io import save_with_config

        save_with_config(torch.nn.Linear(2, 2), tmp_path / "x.safetensors", "other", {})
        load_predictor(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a dynexec digit classifier"):
        load_classifier(tmp_path / "p.safetensors")


# ---- labels -------------------------------------------------------------------------------


def _labels(quality_like, n_per=60, seed=0):
    """Synthetic records over grid (2, 5, 10, 100) for 20 prompts (digits 0-9 at guidance 1 and 4),
    six draws each: features of image i at column g are its reference features plus noise that
    shrinks with the count; the guidance-4 prompts are noisier (a "hard" half)."""
    g = torch.Generator().manual_seed(seed)
    grid = (2, 5, 10, 100)
    n = 2 * n_per
    ref = quality_like.real_features[torch.randperm(len(quality_like.real_features), generator=g)[:n].numpy()]
    ref = torch.tensor(ref, dtype=torch.float32)
    hard = torch.arange(n) >= n_per
    scale = torch.tensor([1.0, 0.3, 0.1, 0.0]).view(1, 4, 1) * (1 + 3 * hard.float()).view(n, 1, 1)
    features = ref.unsqueeze(1) + scale * torch.randn(n, 4, ref.shape[1], generator=g) * 3.0  # [N, 4, F]
    labels = StepLabels(
        digits=torch.arange(n) % 10, guidance=torch.where(hard, 4.0, 1.0), seeds=torch.arange(n),
        draws=(torch.arange(n) // 10) % (n_per // 10), grid=grid, correct=torch.ones(n, 4, dtype=torch.bool),
        features=features, set_accuracy=torch.zeros(0), set_frechet=torch.zeros(0),
    )
    labels._score_sets(quality_like)
    return labels


class _RealFeatures:
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.real_features = (torch.randn(400, 8, generator=g) * 2.0).double().numpy()


def test_labels_round_trip_and_safe_steps(tmp_path):
    quality = _RealFeatures()
    labels = _labels(quality)
    labels.set_accuracy, labels.set_frechet = torch.tensor([0.5, 0.985, 1.0, 0.99]), torch.tensor([9.0, 1.0, 1.05, 1.0])
    # 5 steps: accuracy 0.985 >= 0.99 - 0.01 and Fréchet 1.0 <= 1.1: matches the 100-step set
    assert labels.safe_steps() == 5
    labels.save(tmp_path / "l.safetensors")
    back = StepLabels.load(tmp_path / "l.safetensors")
    assert back.grid == labels.grid and back.safe_steps() == 5 and torch.equal(back.draws, labels.draws)
    torch.testing.assert_close(back.features, labels.features, rtol=1e-3, atol=1e-3)  # stored in fp16
    assert torch.equal(back.correct, labels.correct) and back.prompts() == labels.prompts()


def test_split_by_draws_rescores_each_subset():
    quality = _RealFeatures()
    labels = _labels(quality)
    held = labels.subset(labels.draws >= 3, quality)
    assert set(held.draws.tolist()) == {3, 4, 5} and held.prompts() == labels.prompts()
    last = torch.full((len(held.digits),), len(held.grid) - 1)
    assert held.reference().frechet == pytest.approx(held.report(last, quality).frechet)  # the subset's own set quality
    assert held.reference().frechet != labels.reference().frechet


def test_assigned_steps_are_the_fewest_that_keep_the_set_quality_with_the_margin():
    quality = _RealFeatures()
    labels = _labels(quality)
    ref = labels.reference()
    start = labels.safe_steps()
    counts, report = assign_steps(labels, quality, margin=0.5)
    assert matches(report, ref, frechet_tol=0.05)
    assert set(counts) == set(labels.prompts()) and all(n <= start for n in counts.values())
    # the easy prompts (guidance 1) get fewer steps than the hard ones (guidance 4), on average
    easy = [n for p, n in counts.items() if p.guidance == 1.0]
    hard = [n for p, n in counts.items() if p.guidance == 4.0]
    assert sum(easy) < sum(hard)
    # no prompt can go one grid count lower without breaking the (narrowed) criterion
    owner = {p: i for i, p in enumerate(labels.prompts())}
    rows = [owner[DigitPrompt(int(d), float(g))] for d, g in zip(labels.digits, labels.guidance)]
    for p, n in counts.items():
        if n == labels.grid[0]:
            continue
        lower = {**counts, p: labels.grid[labels.grid.index(n) - 1]}
        cols = torch.tensor([labels.grid.index(lower[labels.prompts()[r]]) for r in rows])
        assert not matches(labels.report(cols, quality), ref, frechet_tol=0.05)
    # no margin: at least as few steps
    loose, _ = assign_steps(labels, quality, margin=0.0)
    assert sum(loose.values()) <= sum(counts.values())
    predictor, rep = train_predictor(labels, quality, margin=0.5)
    assert predictor.table == counts and predictor.safe_steps == start and rep == report
    with pytest.raises(ValueError, match="share of the Fréchet tolerance"):
        assign_steps(labels, quality, margin=1.0)


def test_labels_give_every_image_its_own_seed(tiny):
    """Images of different prompts never share their noise (a shared seed makes a set of images
    less diverse than a deployment's, which moves its Fréchet distance)."""
    from dynexec_compile.stepsaver.quality import DigitClassifier

    torch.manual_seed(0)
    quality = DigitQuality(DigitClassifier())
    prompts = [DigitPrompt(1, 1.0), DigitPrompt(2, 2.0)]
    labels = induce_labels(tiny, quality, prompts, draws=3, first_seed=7, grid=(1, 2))
    assert labels.seeds.tolist() == [7, 8, 9, 10, 11, 12]
    assert labels.draws.tolist() == [0, 1, 2, 0, 1, 2] and labels.digits.tolist() == [1, 1, 1, 2, 2, 2]
    images = tiny.sample([prompts[1]], 2, [10])
    assert torch.allclose(quality.features(images)[0], labels.features[3, -1], atol=1e-2)
    with pytest.raises(ValueError, match="draws is the number of images per prompt"):
        induce_labels(tiny, quality, prompts, draws=0)


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"digit": 10}, "digit must be an int in 0..9"),
    ({"digit": -1}, "digit must be an int in 0..9"),
    ({"digit": 2.0}, "digit must be an int"),
    ({"digit": 2, "guidance": float("nan")}, "guidance must be a finite number >= 0"),
    ({"digit": 2, "guidance": -1.0}, "guidance must be a finite number >= 0"),
])
def test_bad_prompts_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitPrompt(**kwargs)


def test_bad_sampling_arguments_raise(tiny):
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000"):
        tiny.sample([1], 0, [0])
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000"):
        tiny.sample([1], 1001, [0])
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny.sample([1, 2], 3, [0])
    with pytest.raises(TypeError, match="prompts must be a list"):
        tiny.sample(DigitPrompt(1), 3, [0])
    with pytest.raises(ValueError, match="one seed per prompt"):
        StepSaver(tiny, TablePredictor({}))([DigitPrompt(1)], [])
    with pytest.raises(TypeError, match="needs a pipeline with sample"):
        StepSaver(object(), TablePredictor({}))
    with pytest.raises(TypeError, match="needs a predictor with predict"):
        StepSaver(tiny, object())
    with pytest.raises(ValueError, match="num_class_embeds=11"):
        from diffusers import UNet2DModel

        DigitsPipeline(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                                   down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))


# ---- the quality metric -------------------------------------------------------------------


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g).double().numpy()
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # |mean shift|^2, same covariance


def test_matches_uses_both_tolerances():
    ref = QualityReport(0.95, 10.0, 100)
    assert matches(QualityReport(0.945, 10.9, 100), ref)
    assert not matches(QualityReport(0.93, 10.0, 100), ref)
    assert not matches(QualityReport(0.99, 11.5, 100), ref)


@needs_weights
def test_real_images_score_high_and_noise_scores_low():
    quality = DigitQuality.from_file(MODEL_DIR / "classifier.safetensors")
    images, digits = real_digits()
    real = quality.report(images[::2], digits[::2])
    assert real.accuracy > 0.98 and quality.heldout_accuracy > 0.97
    noise = torch.rand(images[::2].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = quality.report(noise, digits[::2])
    assert fake.accuracy < 0.3
    assert real.frechet < 0.1 * fake.frechet


@needs_weights
def test_committed_pipeline_draws_the_asked_digits():
    pipeline = DigitsPipeline.from_pretrained(MODEL_DIR)
    quality = DigitQuality.from_file(MODEL_DIR / "classifier.safetensors")
    prompts = [DigitPrompt(d, 2.0) for d in range(10)] * 2
    images = pipeline.sample(prompts, 20, list(range(20)))
    assert quality.report(images, torch.tensor([p.digit for p in prompts])).accuracy >= 0.85


def test_package_exports_stepsaver_and_the_quick_bench_passes():
    import argparse

    import dynexec_compile as dx
    from dynexec_compile.bench.stepsaver import run

    assert dx.StepSaver is StepSaver
    result = run(argparse.Namespace(quick=True))
    assert result.metrics["stepsaver.pipeline_calls_minus_distinct_counts"].value == 0
    assert result.metrics["stepsaver.reassembled_equals_alone"].value == 1.0
    assert result.metrics["stepsaver.fallback_is_safe_count"].value == 1.0
    assert result.metrics["stepsaver.fallback_warned"].value == 1.0


def test_per_prompt_oracle_lowers_only_the_prompts_that_keep_the_set_quality():
    """Prompt A's images are real digits at every count; prompt B's are real from 5 steps on and
    noise below: the oracle gives A the fewest steps and keeps B at 5."""
    from dynexec_compile.bench.stepsaver import per_prompt_oracle
    from dynexec_compile.stepsaver.quality import DigitClassifier

    torch.manual_seed(0)
    quality = DigitQuality(DigitClassifier())
    real, labels = real_digits()
    a, b = DigitPrompt(0, 1.0), DigitPrompt(1, 4.0)
    prompts = [a] * 150 + [b] * 150
    digits = torch.tensor([0] * 150 + [1] * 150)
    pick = torch.cat([(labels == 0).nonzero()[:150, 0], (labels == 1).nonzero()[:150, 0]])
    good = real[pick]
    noise = torch.rand(150, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    per_count = {}
    for n in (1, 2, 5, 100):
        images = good.clone()
        if n < 5:
            images[150:] = noise
        per_count[n] = (quality.report(images, digits), images)
    ref = per_count[100][0]
    labels = StepLabels.from_images(prompts, list(range(300)), [0] * 300, {n: im for n, (_, im) in per_count.items()}, quality)
    mean, rep, counts = per_prompt_oracle(prompts, labels, quality, start=5)
    assert counts == {"0@1": 1, "1@4": 5}
    assert mean == pytest.approx(3.0) and matches(rep, ref)
