"""Memory is bounded by the header (issue 9, item 4): a header of one million empty tensors
is refused before it is parsed, holding little more than its bytes; a header under the
bound converts with peak RSS within the baseline plus a small multiple of the header.
Peak RSS is each child's own ``ru_maxrss`` (run in a fresh process per measurement)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from surgery.checkpoint.safetensors_file import MAX_TENSORS

ROOT = Path(__file__).resolve().parents[2]  # the project
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=280); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
        "sys.stderr.write(r.stderr)")


def _header_file(path: Path, n: int) -> int:
    body = ",".join(f'"layer.{i}.weight":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    raw = ("{" + body + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return len(raw)


def _peak(*argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PEAK, sys.executable, *argv], capture_output=True, text=True, env=env,
                       timeout=300)
    rc, peak = map(int, r.stdout.split())
    return rc, peak, r.stderr


def test_million_tensor_header_is_refused_with_flat_memory(tmp_path):
    n = _header_file(tmp_path / "big.safetensors", 1_000_000)
    assert n > 50e6
    _, base, _ = _peak("-c", "import surgery.cli")
    for argv in (["convert", tmp_path / "big.safetensors", tmp_path / "out.safetensors"],
                 ["inspect", tmp_path / "big.safetensors"]):
        rc, peak, err = _peak("-m", "surgery", *map(str, argv))
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"more than {MAX_TENSORS:,} tensors" in err
        assert peak - base < 1.5 * n, (peak / 2**20, base / 2**20, n / 2**20)  # the header's bytes, once
    assert not (tmp_path / "out.safetensors").exists()


def test_header_under_the_bound_converts_within_a_small_multiple_of_it(tmp_path):
    n = _header_file(tmp_path / "many.safetensors", 100_000)  # 7 MB of header, 100k tensors
    _, base, _ = _peak("-c", "import surgery.cli, numpy, safetensors")
    rc, peak, err = _peak("-m", "surgery", "convert", str(tmp_path / "many.safetensors"),
                          str(tmp_path / "out.safetensors"), "--quiet")
    assert rc == 0, err
    assert peak - base < 12 * n, ((peak - base) / n, n)
    header_len = struct.unpack("<Q", (tmp_path / "out.safetensors").read_bytes()[:8])[0]
    assert len(json.loads((tmp_path / "out.safetensors").read_bytes()[8:8 + header_len])) == 100_001  # + metadata
