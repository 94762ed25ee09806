set -x
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"
t0=$(date +%s)
SEMANTICGEN_CUDA_ARCHS=9.0a MAX_JOBS=16 timeout 200 python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo build rc=$? in $(( $(date +%s) - t0 )) s; tail -5 $OUT/build.log
python3 -c "import semanticgen._C as c; print('ext ok')"
timeout 200 python3 smoke.py 2>&1 | tee $OUT/smoke.log
echo total $(( $(date +%s) - t0 )) s
