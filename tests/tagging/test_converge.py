"""Fast analysis (workers.tagging.converge): the spread order, the stop rule, and fast vs full on real files.

The rule's own tests feed it made-up per-patch scores (no networks); the
end-to-end ones run the real converted networks on generated music files and
compare the tags the tagger writes after a fast and a full analysis.
"""
from pathlib import Path

import numpy as np
import pytest

from workers.models import Job, Library, Score, Track
from workers.tagging import converge
from workers.tagging.categories import LABELS, get_label
from workers.tagging.tagset import GENRE_FLOOR, UNCALIBRATED, build_tags

from tests.audio_factory import make_file

LABEL_IDS = tuple(LABELS)  # "mtt:..." then "msd:...", as the pipeline's labels


def run_rule(scores: np.ndarray, rule=None) -> converge.Running:
    """A fast analysis of made-up per-patch scores (n, labels), as the pipeline runs it."""
    indices = np.arange(len(scores))[:, None]
    [running] = converge.score_many([indices], [rule or converge.StopRule()], LABEL_IDS,
                                    lambda chosen: scores[chosen[:, 0]])
    return running


def steady(n: int, seed: int = 0, noise: float = 0.01) -> np.ndarray:
    """Every label well clear of its threshold (a tenth of it, or three times it), with a little noise."""
    rng = np.random.default_rng(seed)
    level = np.array([get_label(label).threshold * (2.0 + i / 40 if i % 17 == 0 else 0.1)
                      for i, label in enumerate(LABEL_IDS)])
    return np.clip(level + rng.normal(0, noise, (n, len(LABEL_IDS))), 0, 1).astype(np.float32)


def tags_of(means, spreads) -> dict:
    tagset = build_tags(dict(zip(LABEL_IDS, map(float, means))), dict(zip(LABEL_IDS, map(float, spreads))),
                        UNCALIBRATED, models="m@1", genre_floor=GENRE_FLOOR)
    return tagset.categories


# --------------------------------------------------------------------------- the order


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 50, 101, 400])
def test_spread_order_is_a_permutation(n):
    order = converge.spread_order(n)
    assert sorted(order.tolist()) == list(range(n))


def test_spread_order_covers_the_track_from_the_first_patches():
    n = 200
    order = converge.spread_order(n)
    assert order[0] == n // 2 and 0 not in order[:5].tolist(), "starts mid-file, not on the intro"
    for k in (5, 12, 24, 50):
        first = np.sort(order[:k])
        gaps = np.diff(np.concatenate([[-1], first, [n]]))
        assert gaps.max() <= 2.0 * n / k, (k, gaps.max())  # a low-discrepancy prefix: no stretch left unsampled
    first_minute = np.arange(20)  # what a front-to-back order would score first
    assert len(set(order[:20].tolist()) & set(first_minute.tolist())) <= 3


def test_patch_store_keeps_an_even_bounded_subset_of_a_long_file():
    store = converge.PatchStore(limit=100)
    for start in range(0, 1000, 20):  # chunks, as the decoder hands them over
        store.add(np.full((20, 2, 3), np.arange(start, start + 20)[:, None, None], dtype=np.float32))
    kept = store.patches()
    assert store.seen == 1000 and len(kept) <= 100 and store.stride == 16
    assert kept[:, 0, 0].tolist() == list(range(0, 1000, 16)), "every 16th patch, over the whole file"
    small = converge.PatchStore(limit=100)
    small.add(np.zeros((30, 2, 3), np.float32))
    assert len(small.patches()) == 30 and small.stride == 1


# --------------------------------------------------------------------------- the rule


def test_steady_input_stops_at_the_minimum():
    scores = steady(100)
    running = run_rule(scores)
    assert running.n == converge.MIN_PATCHES
    assert tags_of(*running.result()) == tags_of(scores.mean(0), scores.std(0))


def test_a_short_track_gets_every_patch():
    for n in (1, 5, converge.MIN_PATCHES):
        assert run_rule(steady(n)).n == n


def test_varied_input_keeps_going_and_ends_with_the_full_tags():
    """A label that is clearly present in some passages and absent in others, averaging near its cut-off."""
    n = 90
    scores = steady(n)
    label = "mtt:guitar"
    i, threshold = LABEL_IDS.index(label), get_label(label).threshold
    rng = np.random.default_rng(1)
    scores[:, i] = np.where(rng.random(n) < 0.5, 2.2 * threshold, 0.0)  # mean ≈ 1.1 x threshold: near the cut-off
    running = run_rule(scores)
    assert running.n > 3 * converge.MIN_PATCHES
    assert tags_of(*running.result()) == tags_of(scores.mean(0), scores.std(0))


def test_a_label_on_its_threshold_is_scored_to_the_end():
    scores = steady(60)
    i = LABEL_IDS.index("mtt:piano")
    scores[:, i] = get_label("mtt:piano").threshold + np.where(np.arange(60) % 2, 0.05, -0.05)
    assert run_rule(scores).n == 60


def test_the_strict_rule_scores_more_than_the_budget():
    scores = steady(80, noise=0.06)
    strict, budget = run_rule(scores, converge.StopRule(budget=None)), run_rule(scores)
    assert budget.n < strict.n


def test_errors_vanish_at_the_last_patch():
    running = converge.Running(3)
    running.add(np.random.default_rng(0).random((10, 3)))
    _, spread, se_mean, se_spread = running.errors(10)
    assert spread.min() > 0 and np.all(se_mean == 0) and np.all(se_spread == 0)
    assert np.all(running.errors(40)[2] > 0)


def test_rule_for_follows_the_library():
    full = Library(name="a", root="/x", analysis=Library.Analysis.FULL)
    assert converge.rule_for(full) is None
    fast = Library(name="b", root="/x", write_mode=Library.WriteMode.FULL)
    rule = converge.rule_for(fast)
    assert rule is not None and set(rule.tiers) == {"regular", "strict", "loose"}
    assert converge.rule_for(full, analysis="fast") is not None and converge.rule_for(fast, analysis="full") is None
    assert converge.rule_for(None).genre_floor is None, "a file outside any library gets no fallback genre"


# --------------------------------------------------------------------------- the real networks


@pytest.fixture(scope="module")
def analyzer(installed_models_dir):
    from workers.tagging.pipeline import Analyzer, use_threads

    use_threads(1)
    return Analyzer("cpu", models_dir=installed_models_dir)


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    root = tmp_path_factory.mktemp("converge")
    return [make_file(root, "flac", seconds=75, seed=3, name="long.flac"),
            make_file(root, "mp3", seconds=50, seed=8, name="mid.mp3"),
            make_file(root, "ogg", seconds=20, seed=5, name="short.ogg")]


def test_fast_and_full_write_the_same_tags_on_real_files(analyzer, music):
    patches = []
    for path in music:
        full = analyzer.analyze(path)
        fast = analyzer.analyze(path, until=converge.StopRule())
        assert full.patches == full.patches_total == fast.patches_total
        assert fast.patches <= full.patches
        assert tags_of(fast.means, fast.spreads) == tags_of(full.means, full.spreads), path.name
        patches.append((fast.patches, full.patches))
    assert patches[-1][0] == patches[-1][1], "a 20 s file (7 patches) is scored whole"
    batched = analyzer.analyze_many(music, [converge.StopRule()] * len(music))
    for path, one in zip(music, batched):
        alone = analyzer.analyze(path, until=converge.StopRule())
        assert one.patches == alone.patches and np.allclose(one.means, alone.means, atol=1e-5)


@pytest.mark.django_db
def test_the_library_setting_decides_and_full_scores_every_patch(analyzer, music, tmp_path, settings,
                                                                   installed_models_dir):
    from tests.tagging.test_tagger import scan_and_tag
    from workers.tagging.tag_worker import TagWorker

    settings.EARMARK_MODELS_DIR = installed_models_dir
    worker = TagWorker(device="cpu")
    worker.analyzer, worker.batch_size, worker.lookahead = analyzer, 1, False
    results = {}
    for mode in ("full", "fast"):
        root = tmp_path / mode
        root.mkdir()
        library = Library.objects.create(name=mode, root=str(root), analysis=mode)
        path = Path(root) / music[0].name
        path.write_bytes(music[0].read_bytes())
        assert scan_and_tag(library, worker) == []
        job = Job.objects.get(queue="tag", library=library)
        track = Track.objects.get(library=library)
        results[mode] = (job.result, track.earmark_tags, Score.objects.get(track=track).patches)
    (full, full_tags, full_patches), (fast, fast_tags, fast_patches) = results["full"], results["fast"]
    assert full["patches"] == full["patches_total"] == full_patches == 25  # 75 s: 25 patches, every one scored
    assert fast["patches_total"] == 25 and fast["patches"] == fast_patches <= 25
    assert fast_tags == full_tags


def test_bf16_timbral_convs_stay_near_the_reference_and_switch_back(installed_models_dir):
    import torch

    from workers.tagging import fast, loading

    reference = np.load(Path(__file__).resolve().parents[1] / "fixtures" / "musicnn_parity" / "reference.npz")
    net = loading.load("MTT_musicnn", models_dir=installed_models_dir)

    def error():
        with torch.inference_mode():
            return max(float(np.abs(net(torch.from_numpy(reference[f"input/{clip}"])).numpy()
                                    - reference[f"MTT_musicnn/{clip}"]).max()) for clip in ("piano", "techno", "sine"))

    with fast.bf16_timbral([net]):
        assert 1e-4 < error() < 2e-2, "bfloat16 moves a patch's outputs a little, never by a tag's worth"
    assert error() < 1e-4, "float32 again after the block: full analysis stays exact"
