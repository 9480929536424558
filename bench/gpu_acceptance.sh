#!/usr/bin/env bash
# The GPU acceptance run: parity tests (large cases split over parallel processes, since the
# NumPy reference is slow and single-threaded), compute-sanitizer on every kernel, then the
# step benchmark alone on a quiet machine. Logs go to ${OUT:-/tmp/gpu_acceptance}.
# CRYOKERN_REQUIRE_TORCH=1: the step's comparison with PyTorch fails, not skips, without torch.
set -u
export CRYOKERN_REQUIRE_TORCH=1
out=${OUT:-/tmp/gpu_acceptance}; mkdir -p "$out"
nvidia-smi -L
python3 -c "import numba, numpy, torch; print('numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
python3 bench/sanitize_case.py > /dev/null   # compile once, so that the parallel runs share the disk cache
(cd bench && python3 profile_case.py > /dev/null 2>&1)   # and the default network's kernels
groups=("test_kernels.py and 4x16x16x1024 and forward"
        "test_kernels.py and 4x16x16x1024 and backward_data"
        "test_kernels.py and 997x1013 and (forward or backward_data)"
        "test_kernels.py and backward_weights and (1024 or 997)"
        "test_kernels.py and not 1024x1024 and not 997x1013 and not test_deterministic and not (weights_variants or outputs_per_thread or outputs_must_divide)"
        "test_kernels.py and not 1024x1024 and not 997x1013 and (weights_variants or outputs_per_thread or outputs_must_divide)"
        "not test_kernels.py and not 1024x1024 and not 997x1013 and not test_deterministic"
        "test_deterministic or ((test_loss_and_grad or over_the_prediction or stay_on_the_device or per_image_sums) and (1024 or 997))")
pids=()
for i in "${!groups[@]}"; do
  python3 -m pytest -q -rs -p no:cacheprovider tests -k "${groups[$i]}" > "$out/pytest_$i.txt" 2>&1 &
  pids+=($!)
done
for tool in memcheck racecheck initcheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_case.py > "$out/sanitizer_$tool.txt" 2>&1
  echo "compute-sanitizer --tool $tool: exit $?  $(grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY' "$out/sanitizer_$tool.txt" | tail -1)"
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; echo "pytest group $i (${groups[$i]}): exit $?  $(tail -1 "$out/pytest_$i.txt")"
done
python3 bench/step.py "$@" 2>&1 | tee "$out/step.txt"
