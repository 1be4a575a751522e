"""The storage layer under damage: any byte corruption or manifest edit is rejected with
ArtifactError or loads exactly the written values (Hypothesis), paths outside the folder are
refused, every loader names the file and the problem, files respect the umask, stale temporaries
are removed, and a replaced artifact is loadable at every instant."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_influence.ekfac.factors import EKFACFactors, LayerFactors, load_factors, save_factors
from lightning_influence.scores import InfluenceScores, load_scores, save_scores
from lightning_influence.atomicfs import TEMP_DIR
from lightning_influence.storage import (
    ArtifactError,
    list_artifacts,
    manifest_digest,
    read_artifact,
    write_artifact,
)
from lightning_influence.z0.artifact import Z0Result, load_z0, write_z0

DTYPES = (torch.float32, torch.float64, torch.int64)


def _tensors(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        dt = DTYPES[(seed + i) % 3]
        shape = (1 + (seed + i) % 4, 1 + (seed * 7 + i) % 3)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        out[f"t{i}"] = (t * 100).long() if dt == torch.int64 else t.to(dt)
    return out


def _assert_exact(tensors, manifest, written, written_manifest):
    assert set(tensors) == set(written)
    for k, t in written.items():
        assert tensors[k].dtype == t.dtype and torch.equal(tensors[k], t), k
    assert manifest == written_manifest


# -- Hypothesis: damage is rejected or harmless ----------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=4),
                           lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=3), c, max_size=2), max_leaves=4)

damage = st.one_of(
    st.tuples(st.just("flip"), st.sampled_from(["tensors.safetensors", "manifest.json", "table.csv"]),
              st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.sampled_from(["tensors.safetensors", "manifest.json", "table.csv"]), st.integers(0, 10**6)),
    st.tuples(st.just("append"), st.sampled_from(["tensors.safetensors", "manifest.json", "table.csv"]), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete_key"), st.integers(0, 100)),
    st.tuples(st.just("set_key"), st.integers(0, 100), json_values),
    st.tuples(st.just("add_key"), st.text(min_size=1, max_size=6), json_values),
    st.tuples(st.just("reformat"), st.sampled_from([None, 0, 4])),
    st.tuples(st.just("remove"), st.sampled_from(["tensors.safetensors", "manifest.json", "table.csv"])),
)


def _damage(d: Path, how) -> None:
    kind = how[0]
    if kind in ("flip", "truncate", "append"):
        p = d / how[1]
        data = bytearray(p.read_bytes())
        if kind == "flip":
            i = how[2] % len(data)
            data[i] ^= how[3]
        elif kind == "truncate":
            data = data[: how[2] % len(data)]
        else:
            data += how[2]
        p.write_bytes(bytes(data))
        return
    if kind == "remove":
        (d / how[1]).unlink()
        return
    m = json.loads((d / "manifest.json").read_text())
    keys = sorted(m)
    if kind == "delete_key":
        del m[keys[how[1] % len(keys)]]
    elif kind == "set_key":
        m[keys[how[1] % len(keys)]] = how[2]
    elif kind == "add_key":
        m[how[1]] = how[2]
    (d / "manifest.json").write_text(json.dumps(m, indent=how[1] if kind == "reformat" else 2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), n=st.integers(1, 3), how=damage)
def test_any_damage_is_rejected_or_loads_exactly_what_was_written(seed, n, how):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "art"
        written = _tensors(seed, n)
        write_artifact(d, "thing", written, {"layers": [{"name": "a", "n": seed}], "note": "x"},
                       extra_files={"table.csv": "id,score\n1,0.5\n"})
        _, written_manifest = read_artifact(d, kind="thing")
        _damage(d, how)
        try:
            tensors, manifest = read_artifact(d, kind="thing")
        except ArtifactError:
            return
        _assert_exact(tensors, manifest, written, written_manifest)


def _factors(seed: int) -> EKFACFactors:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (d_in, d_out, bias) in {"net.0": (3, 2, True), "net.2": (2, 2, False)}.items():
        a = d_in + int(bias)
        layers[name] = LayerFactors(torch.linalg.qr(torch.randn(a, a, generator=g, dtype=torch.float64))[0],
                                    torch.rand(a, generator=g, dtype=torch.float64),
                                    torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0],
                                    torch.rand(d_out, generator=g, dtype=torch.float64),
                                    torch.rand(d_out, a, generator=g, dtype=torch.float64), d_in, d_out, bias)
    return EKFACFactors(layers, "empirical", 10, 10, {"k": seed})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 50), how=damage.filter(lambda h: h[0] != "remove" or h[1] != "table.csv"))
def test_loaders_reject_damage_or_load_exactly(seed, how):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        f = _factors(seed)
        save_factors(f, root / "f")
        s = InfluenceScores("x", torch.arange(4) * 3, self_influence=torch.rand(4, generator=torch.Generator().manual_seed(seed)))
        save_scores(s, root / "s")
        z = Z0Result(torch.eye(2, dtype=torch.float64), torch.arange(3), torch.rand(2, 3), torch.tensor([1, 2]), torch.tensor([0, 1]))
        write_z0(root / "z", z)
        for folder, load, check in (
            ("f", load_factors, lambda got: all(torch.equal(getattr(got.layers[n], k), getattr(f.layers[n], k))
                                                for n in f.layers for k in ("q_a", "eig_a", "q_s", "eig_s", "lambdas"))
             and got.layer_names == f.layer_names and got.meta == f.meta),
            ("s", load_scores, lambda got: torch.equal(got.train_ids, s.train_ids) and torch.equal(got.self_influence, s.self_influence)),
            ("z", load_z0, lambda got: torch.equal(got.gram, z.gram) and torch.equal(got.probe_losses, z.probe_losses)),
        ):
            d = root / folder
            if how[0] in ("flip", "truncate", "append", "remove") and not (d / how[1]).exists():
                continue
            _damage(d, how)
            try:
                got = load(d)
            except ArtifactError as e:
                assert str(d) in str(e)  # the message names the artifact
                continue
            assert check(got), (folder, how)


# -- specific damage: named, and refused --------------------------------------------------------------
def _edit_manifest(d: Path, edit) -> None:
    """Edit the manifest and re-sign it (what only someone who means it can do)."""
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_an_edited_manifest_fails_its_checksum_even_when_only_a_layer_is_dropped(tmp_path):
    save_factors(_factors(0), tmp_path / "f")
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    m["layers"] = m["layers"][:1]
    (tmp_path / "f" / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(ArtifactError, match="manifest_sha256 check: the manifest was edited"):
        load_factors(tmp_path / "f")
    # re-signed, the dropped layer's tensors are still there: refused, not loaded with fewer layers
    _edit_manifest(tmp_path / "f", lambda m: m.update(layers=m["layers"][:1]))
    with pytest.raises(ArtifactError, match=r"tensors \['net.2::eig_a'.*belong to no layer"):
        load_factors(tmp_path / "f")


def test_a_tensor_file_outside_the_folder_is_never_read(tmp_path):
    secret = tmp_path / "secret.safetensors"
    write_artifact(tmp_path / "a", "thing", {"x": torch.ones(2)}, {})
    shutil.copy(tmp_path / "a" / "tensors.safetensors", secret)
    for name in ("../secret.safetensors", str(secret), "..", "sub/tensors.safetensors"):
        _edit_manifest(tmp_path / "a", lambda m: m.update(tensor_file=name))
        with pytest.raises(ArtifactError, match="is not a file name inside the artifact folder"):
            read_artifact(tmp_path / "a")


@pytest.mark.parametrize("load, write", [
    (load_factors, lambda d: save_factors(_factors(1), d)),
    (load_scores, lambda d: save_scores(InfluenceScores("x", torch.arange(3), self_influence=torch.rand(3)), d)),
    (load_z0, lambda d: write_z0(d, Z0Result(torch.eye(2, dtype=torch.float64), torch.arange(3), torch.rand(2, 3),
                                             torch.tensor([1, 2]), torch.tensor([0, 1])))),
])
def test_every_loader_names_the_file_and_the_problem(tmp_path, load, write):
    d = tmp_path / "a"
    write(d)
    manifest = d / "manifest.json"
    good = manifest.read_text()
    for text, problem in (("[1, 2]", "is not a JSON object"), ("{", "is not valid JSON"), ("3", "is not a JSON object")):
        manifest.write_text(text)
        with pytest.raises(ArtifactError, match=problem) as e:
            load(d)
        assert str(manifest) in str(e.value)
    manifest.write_text(good)
    _edit_manifest(d, lambda m: m.update(kind="other"))
    with pytest.raises(ArtifactError, match=r"holds a 'other' artifact, expected"):
        load(d)
    manifest.write_text(good)
    _edit_manifest(d, lambda m: m.pop("tensor_sha256"))
    with pytest.raises(ArtifactError, match=r"manifest.json: 'tensor_sha256' is missing"):
        load(d)
    manifest.write_text(good)
    _edit_manifest(d, lambda m: m.update(format_version=1))
    with pytest.raises(ArtifactError, match="format_version 1 is not readable"):
        load(d)


def test_loaders_check_lengths_and_types_behind_a_valid_checksum(tmp_path):
    write_artifact(tmp_path / "s", "scores", {"train_ids": torch.arange(4), "pairwise": torch.rand(2, 4), "query_ids": torch.arange(3)},
                   {"method": "x"})
    with pytest.raises(ArtifactError, match=r"tensor 'pairwise' has shape \[2, 4\], expected \[3, 4\]"):
        load_scores(tmp_path / "s")
    write_artifact(tmp_path / "t", "scores", {"train_ids": torch.arange(4).float(), "self_influence": torch.rand(4)}, {})
    with pytest.raises(ArtifactError, match="tensor 'train_ids' has dtype torch.float32"):
        load_scores(tmp_path / "t")
    write_artifact(tmp_path / "u", "scores", {"train_ids": torch.arange(4), "self_influence": torch.rand(4)}, {"n_train": 5})
    with pytest.raises(ArtifactError, match="n_train=5 but train_ids has 4"):
        load_scores(tmp_path / "u")
    write_artifact(tmp_path / "z", "z0", {"gram": torch.eye(2, dtype=torch.float64), "probe_ids": torch.arange(3),
                                          "probe_losses": torch.rand(2, 4), "steps": torch.arange(2), "epochs": torch.arange(2)}, {})
    with pytest.raises(ArtifactError, match=r"tensor 'probe_losses' has shape \[2, 4\], expected \[2, 3\]"):
        load_z0(tmp_path / "z")
    f = _factors(2)
    f.layers["net.0"].lambdas[0, 0] = float("nan")
    save_factors(f, tmp_path / "f")
    with pytest.raises(ArtifactError, match="'net.0::lambdas' holds non-finite values"):
        load_factors(tmp_path / "f")
    save_factors(_factors(2), tmp_path / "g")
    _edit_manifest(tmp_path / "g", lambda m: m["layers"][0].pop("d_in"))
    with pytest.raises(ArtifactError, match=r"manifest.json: 'd_in' must be int, got missing"):
        load_factors(tmp_path / "g")


# -- permissions, temporaries, replacement ------------------------------------------------------------
def test_files_get_the_permissions_the_umask_allows(tmp_path):
    old = os.umask(0o027)
    try:
        write_artifact(tmp_path / "a", "thing", {"x": torch.ones(1)}, {}, extra_files={"t.csv": "a\n"})
    finally:
        os.umask(old)
    for name in ("tensors.safetensors", "manifest.json", "t.csv"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o640, name
    old = os.umask(0o022)
    try:
        write_artifact(tmp_path / "b", "thing", {"x": torch.ones(1)}, {})
        from lightning_influence.z0.gram import SnapshotGram

        g = SnapshotGram(tmp_path / "snaps")
        g.append({"w": torch.ones(3)})
    finally:
        os.umask(old)
    assert (tmp_path / "b" / "tensors.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors alone writes 0600
    assert g.path(0).stat().st_mode & 0o777 == 0o644


def test_stale_temporaries_of_the_library_are_removed_at_the_next_write(tmp_path):
    write_artifact(tmp_path / "x", "thing", {"v": torch.zeros(1)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # the temporary folder goes once empty
    temp = tmp_path / TEMP_DIR
    for name in ("x.tmp-0123abcd", "x.old-89abcdef", "y.tmp-0123abcd", "x.tmp-notmine"):
        (temp / name).mkdir(parents=True)
        (temp / name / "tensors.safetensors").write_bytes(b"partial")
    write_artifact(tmp_path / "x", "thing", {"v": torch.ones(1)}, {})
    assert sorted(p.name for p in temp.iterdir()) == ["x.tmp-notmine", "y.tmp-0123abcd"]  # others' are kept
    assert torch.equal(read_artifact(tmp_path / "x")[0]["v"], torch.ones(1))


def test_an_artifact_renamed_aside_by_an_unfinished_replacement_is_read_listed_and_replaced(tmp_path):
    write_artifact(tmp_path / "run" / "x", "thing", {"v": torch.zeros(2)}, {})
    # what a crash between the two renames leaves: the old artifact aside, the new one complete in a temporary
    (tmp_path / "run" / TEMP_DIR).mkdir()
    os.replace(tmp_path / "run" / "x", tmp_path / "run" / TEMP_DIR / "x.old-0000aaaa")
    (tmp_path / "run" / TEMP_DIR / "x.tmp-0000bbbb").mkdir()
    assert torch.equal(read_artifact(tmp_path / "run" / "x")[0]["v"], torch.zeros(2))
    assert [(i.path.name, i.kind) for i in list_artifacts(tmp_path)] == [("x", "thing")]
    with pytest.raises(ArtifactError, match="holds a 'thing' artifact"):
        write_artifact(tmp_path / "run" / "x", "other", {"v": torch.ones(2)}, {})
    write_artifact(tmp_path / "run" / "x", "thing", {"v": torch.ones(2)}, {})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["x"]
    assert torch.equal(read_artifact(tmp_path / "run" / "x")[0]["v"], torch.ones(2))


def test_finding_stale_temporaries_does_not_scan_a_folder_of_many_artifacts(tmp_path, monkeypatch):
    import lightning_influence.atomicfs as atomicfs

    for i in range(50):
        (tmp_path / f"shard_{i:03d}").mkdir()
    scanned = []
    real = os.scandir
    monkeypatch.setattr(atomicfs.os, "scandir", lambda p: scanned.append(str(p)) or real(p))
    write_artifact(tmp_path / "shard_new", "thing", {"v": torch.ones(1)}, {})
    assert all(p.endswith(TEMP_DIR) for p in scanned), scanned


@pytest.mark.parametrize("exchange", [True, False])
def test_readers_always_find_a_complete_artifact_while_it_is_replaced(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setenv("LIGHTNING_INFLUENCE_NO_EXCHANGE", "1")  # the two-rename fallback
    d = tmp_path / "x"
    write_artifact(d, "thing", {"v": torch.zeros(2000)}, {"version": 0})
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                t, m = read_artifact(d)
            except Exception as e:  # noqa: BLE001 - any failure fails the test
                errors.append(repr(e))
                return
            assert torch.equal(t["v"], torch.full((2000,), float(m["version"])))  # never a mix of two versions
            seen.add(m["version"])

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        for version in range(1, 40):
            write_artifact(d, "thing", {"v": torch.full((2000,), float(version))}, {"version": version})
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors[:3]
    assert len(seen) > 1 and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_the_report_names_each_bad_artifact_and_goes_on(tmp_path, capsys):
    from lightning_influence.cli import main

    root = tmp_path / "run" / "influence"
    save_scores(InfluenceScores("good", torch.arange(5), self_influence=torch.arange(5.0)), root / "good" / "self_influence")
    save_factors(_factors(3), root / "ekfac" / "factors")
    save_scores(InfluenceScores("x", torch.arange(3), self_influence=torch.rand(3)), root / "lengths" / "self_influence")
    save_scores(InfluenceScores("x", torch.arange(3), self_influence=torch.rand(3)), root / "array" / "self_influence")
    write_z0(root / "z0" / "recording", Z0Result(torch.eye(2, dtype=torch.float64), torch.arange(3), torch.rand(2, 3),
                                                torch.tensor([1, 2]), torch.tensor([0, 1])))
    _edit_manifest(root / "ekfac" / "factors", lambda m: m.pop("layers"))  # a missing key (was a KeyError)
    write_artifact(root / "lengths" / "self_influence", "scores", {"train_ids": torch.arange(4), "self_influence": torch.rand(3)}, {})
    (root / "array" / "self_influence" / "manifest.json").write_text("[1, 2]")  # valid JSON, not an object
    _edit_manifest(root / "z0" / "recording", lambda m: m.update(param_names="w"))  # a key of the wrong type
    assert main(["report", str(tmp_path / "run"), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "good" in captured.out and "Traceback" not in captured.err
    warned = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    for rel, problem in (("ekfac/factors", "'layers' must be list, got missing"), ("lengths/self_influence", "expected [4]"),
                         ("array/self_influence", "no readable manifest.json"), ("z0/recording", "'param_names' must be list")):
        assert any(rel in line and problem in line for line in warned), (rel, warned)
