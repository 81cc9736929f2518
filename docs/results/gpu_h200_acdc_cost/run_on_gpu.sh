#!/bin/bash
# GPU check: the benchmark's cost stage (s/it, peak memory, finite losses under CUDA AMP) of stock nnUNetTrainer and
# our trainers at nnU-Net's own ACDC 2d plans (planned on all 200 ACDC training volumes), on the quick 5-patient
# ACDC workdir prepared on the CPU machine.
# Expects, under the repository root: .gpu/wd (the prepared work folder: see README.md here), .gpu/acdc_src/ (an
# empty training/ and ssl4mis_split.json), .gpu/stub/SimpleITK/ (stub_SimpleITK/ here) and .whl/ (wheels of nnU-Net
# 2.8.1, its missing dependencies and this package, for Python 3.12). It is how the measurement was made on the lent
# machine, not a user command: with nnU-Net installed, users run the benchmark command directly.
set -o pipefail
R=$(cd "$(dirname "$0")/.." && pwd); mkdir -p /tmp/gpurun; cd /tmp/gpurun  # not the repo root: its source tree would shadow the installed package
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 nnUNet_compile=f nnUNet_n_proc_DA=${NPROC_DA:-12} nnUNet_def_n_proc=8
DEV=${DEV:-cuda}; PY=${PY:-python3}
$PY -V; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -z "$SKIP_INSTALL" ]; then  # no pip into the system Python (it may be externally managed): a target folder
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --find-links $R/.whl \
    nnunetv2 acvl-utils batchgenerators batchgeneratorsv2 blosc2 dynamic-network-architectures graphviz nibabel yacs \
    connected-components-3d ndindex pydantic pydantic-core annotated-types typing-inspection nnunet-contrastive || exit 2
  export PYTHONPATH=/tmp/site nnUNet_extTrainer=/tmp/site/nnunet_contrastive/_nnunet_ext  # .pth files are not read there
fi
$PY -c "import SimpleITK" 2>/dev/null || export PYTHONPATH=$R/.gpu/stub${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import torch, nnunetv2, nnunet_contrastive.trainers as t; print('torch', torch.__version__, torch.cuda.is_available())" || exit 3
R=$R $PY - <<'PY'
import json, os
p = os.environ["R"] + "/.gpu/wd/benchmark_setup.json"; s = json.load(open(p)); s["source"] = os.environ["R"] + "/.gpu/acdc_src"
json.dump(s, open(p, "w"), indent=1)
PY
timeout ${LIMIT:-480} $PY -m nnunet_contrastive.cli benchmark --dataset acdc --quick --plans-override none \
  --device $DEV --skip-label-efficiency --workdir $R/.gpu/wd --data $R/.gpu/acdc_src --out $OUT/report \
  --trainers ${TRAINERS:-nnUNetTrainerSPCon nnUNetTrainerGlobalLocal nnUNetTrainerPLCon nnUNetTrainerARCO nnUNetTrainerMeanTeacher nnUNetTrainerBCP} \
  --cost-warmup ${WARM:-5} --cost-iterations ${ITS:-20} 2>&1 | tee $OUT/benchmark.log
rc=$?
tar czf $OUT/cost.tgz -C $R/.gpu/wd cost 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
echo "rc=$rc"
