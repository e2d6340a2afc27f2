#!/bin/bash
# Run HERE (a machine with PyPI), before scripts/gpu_check.sh runs on a lent GPU machine: that
# machine has no network and no megatron-core, so the wheel travels with the working tree in the
# git-ignored .whl/ folder, and gpu_check.sh installs it there (--no-index --no-deps).
#
#   scripts/gpu_fetch_wheels.sh            # idempotent: a wheel already in .whl/ is not fetched again
#
# The GPU machine has Python 3.12 and torch, numpy, packaging, tensorboard, xxhash, psutil, pytest
# and triton; this checks that the wheel needs nothing else (its unconditional Requires-Dist).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PYTHON:-python3}
VERSION=0.16.1
# What the lent GPU machine has installed (the device tool's description of it).
GPU_MACHINE_HAS="torch numpy packaging tensorboard xxhash psutil pytest triton"
mkdir -p .whl
shopt -s nullglob
wheels=(.whl/megatron_core-"$VERSION"-cp312-*manylinux*x86_64*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "> downloading megatron-core==$VERSION (cp312, manylinux x86_64) into .whl/"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "megatron-core==$VERSION"
    wheels=(.whl/megatron_core-"$VERSION"-cp312-*manylinux*x86_64*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_fetch_wheels.sh: pip left no cp312 manylinux x86_64 wheel of megatron-core==$VERSION in .whl/" \
             "(found: $(ls .whl))" >&2
        exit 1
    fi
else
    echo "> already in .whl/: ${wheels[*]}"
fi
# gpu_check.sh installs every .whl/*.whl: a stray wheel of another version would go too.
for w in .whl/*.whl; do
    case " ${wheels[*]} " in *" $w "*) ;; *) echo "gpu_fetch_wheels.sh: $w is not the wheel gpu_check.sh expects; remove it" >&2; exit 1;; esac
done
"$PY" - "${wheels[0]}" "$GPU_MACHINE_HAS" <<'EOF'
import re
import sys
import zipfile

wheel, available = sys.argv[1], set(sys.argv[2].split())
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
requires = [l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Dist:")]
# Only what pip would install without extras: requirements whose marker names no extra.
needed = [r for r in requires if "extra ==" not in r.replace("extra==", "extra ==")]
print(f"> {wheel}: {len(requires)} Requires-Dist, {len(needed)} without an extra:")
missing = []
for r in needed:
    name = re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-")
    ok = name in available
    print(f"    {r:40s} {'on the GPU machine' if ok else 'MISSING on the GPU machine'}")
    if not ok:
        missing.append(name)
if missing:
    sys.exit(f"gpu_fetch_wheels.sh: the GPU machine lacks {missing}; fetch their wheels into .whl/ too "
             "(and check gpu_check.sh installs them)")
print(f"> ok: {wheel} ({sum(i.file_size for i in zipfile.ZipFile(wheel).infolist()) / 1e6:.1f} MB unpacked) "
      "needs only what the GPU machine has")
EOF
