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
# the large cases, one group a process (the reference's speed bounds them)
groups=("test_kernels.py and 4x16x16x1024 and forward"
        "test_kernels.py and 4x16x16x1024 and backward_data"
        "test_kernels.py and 997x1013 and (forward or backward_data)"
        "test_kernels.py and backward_weights and (1024 or 997)"
        "test_deterministic or ((test_loss_and_grad or over_the_prediction or stay_on_the_device or per_image_sums) and (1024 or 997))")
pids=() logs=()
for i in "${!groups[@]}"; do
  python3 -m pytest -q -rs -p no:cacheprovider tests -k "${groups[$i]}" > "$out/pytest_$i.txt" 2>&1 &
  pids+=($!) logs+=("$out/pytest_$i.txt")
done
# every other GPU case (~70, each compiling its own kernels), dealt round-robin to 12 processes
# (two groups of them ran past a 540-s call on 2026-12-01; split, they took 160 s)
python3 -m pytest --collect-only -q -p no:cacheprovider tests -m gpu -k "not 1024x1024 and not \
997x1013 and not test_deterministic and not ((test_loss_and_grad or over_the_prediction or \
stay_on_the_device or per_image_sums) and (1024 or 997))" | grep '::' > "$out/rest_ids.txt"
split -n r/12 "$out/rest_ids.txt" "$out/rest_"
for chunk in "$out"/rest_??; do
  [ -s "$chunk" ] || continue
  # shellcheck disable=SC2046
  python3 -m pytest -q -rs -p no:cacheprovider $(cat "$chunk") > "$chunk.txt" 2>&1 &
  pids+=($!) logs+=("$chunk.txt")
  groups+=("$(wc -l < "$chunk") other GPU cases, $(basename "$chunk")")
done
for tool in memcheck racecheck initcheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_case.py > "$out/sanitizer_$tool.txt" 2>&1
  echo "compute-sanitizer --tool $tool: exit $?  $(grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY' "$out/sanitizer_$tool.txt" | tail -1)"
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; echo "pytest group $i (${groups[$i]}): exit $?  $(tail -1 "${logs[$i]}")"
done
python3 bench/step.py "$@" 2>&1 | tee "$out/step.txt"
