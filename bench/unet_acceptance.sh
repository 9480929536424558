#!/usr/bin/env bash
# The U-Net acceptance run of issue 19 (points 1-3) on one H200, in two device calls that each
# end inside the 10-minute limit of a call (the stages are cut at DEADLINE_S, default 560 s,
# so that the summary still prints; 1200 s for `all`):
#   bash bench/unet_acceptance.sh quality  # bench/quality.py: both U-Nets (Adam) beside Topaz,
#                                          # BUDGET_S (default 70) s of training each (~7.5
#                                          # min with cold kernel caches)
#   bash bench/unet_acceptance.sh speed    # bench/step.py and bench/denoise.py on the three
#                                          # U-Nets (bench/nets.py's preset unets: the 48-wide,
#                                          # the Noise2Noise paper's and the lean), then the
#                                          # U-Net parity tests in parallel groups and
#                                          # compute-sanitizer on bench/sanitize_unet.py (~8 min
#                                          # with two U-Nets; the paper's adds ~1.5 min, its
#                                          # kernels' compile included: not yet measured)
#   bash bench/unet_acceptance.sh all      # both in turn (over 10 minutes: not one call)
# quality's U-Nets: the 48-wide 48,48,48,48,48,48 (train's default U-Net) and the lean
# 16,24,32,48,64 (NETS overrides, e.g. NETS="unet:16,24,32,48,64+residual n2n"). Logs and JSON
# in ${OUT:-/tmp/unet_acceptance}; bench/unet_summary.py's table last. Kernels are cached in
# $CRYOKERN_CACHE (default /tmp/cryokern-cache-unet: a second call on a machine that is still
# warm finds them). Topaz runs when it imports (PYTHONPATH with .topaz).
# Environment, for speed split over two calls: FIGURES=0 leaves out the step and denoise
# figures, TESTS=0 the pytest groups; TOOLS the sanitizer tools (default: memcheck racecheck
# initcheck; TOOLS= none); RACECHECK_CASES the cases of bench/sanitize_unet.py that racecheck
# runs, a process each (default: 0 1 2).
# --device cpu (after the stage): every stage at toy sizes on the CPU (compiled backend;
# pytest only collects its groups; sanitize_unet.py without compute-sanitizer): a smoke test
# of this script, not a figure.
set -u
stage=${1:-all}
device=gpu
[ "${2:-}" = "--device" ] && device=${3:-gpu}
case "$stage" in quality|speed|all) ;; *) echo "usage: $0 quality|speed|all [--device cpu]"; exit 2;; esac
case "$device" in gpu|cpu) ;; *) echo "$0: --device gpu|cpu, not $device"; exit 2;; esac
out=${OUT:-/tmp/unet_acceptance}; mkdir -p "$out"
export CRYOKERN_CACHE=${CRYOKERN_CACHE:-/tmp/cryokern-cache-unet} CRYOKERN_REQUIRE_TORCH=1
nets=${NETS:-"unet:48,48,48,48,48,48 unet:16,24,32,48,64"}
start=$SECONDS
deadline=${DEADLINE_S:-560}; [ "$stage" = all ] && deadline=${DEADLINE_S:-1200}
left() { echo $(( deadline - (SECONDS - start) )); }
status() {  # status NAME EXIT LOGFILE [NOTE]: one line in NAME.status for the summary
  echo "$1: exit $2  $(grep -v '^\s*$' "$3" 2>/dev/null | tail -1)${4:+  [$4]}" > "$out/$1.status"
  cat "$out/$1.status"
}
precompile_tests() {  # the parity tests' own networks, compiled before their groups share the cache
  # one network at a time (each takes a worker a core): seven started at once made ~110 worker
  # processes, and their CUDA contexts failed to start (CUDA_ERROR_OUT_OF_MEMORY, 2026-12-02)
  timeout "$(left)" python3 -c "
from cryokern import precompile
from cryokern.model import N2NUNet, Network, UNet
from cryokern.step import OptimizerConfig as O
for net, optimizer in [(UNet((8, 8, 8, 8), residual=True), O('adam', 1e-3)),
                       (UNet((8, 8, 8, 8)), O('sgd', 0.05, momentum=0.9)),
                       (Network((1, 4, 4, 1)), O('sgd', 0.0)),
                       (N2NUNet(), O('adam', 1e-3)),
                       (N2NUNet(3, 8, 12, (8, 4)), O('sgd', 0.05, momentum=0.9)),
                       (N2NUNet(3, 6, 8, (6, 4)), O('sgd', 0.0)),
                       (N2NUNet(2, 2, 3, (3, 2)), O('adam', 1e-3))]:
    precompile.start(net, optimizer).wait()" > "$out/precompile_tests.txt" 2>&1
  status precompile_tests $? "$out/precompile_tests.txt"
}
if [ "$device" = gpu ]; then
  nvidia-smi -L
  python3 -c "import numba, numpy, torch; print('numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
  python3 -c "import topaz" 2>/dev/null || echo "topaz does not import: quality runs without it"
  toy_quality=() toy_step=() toy_denoise=()
else
  toy_quality=(--size 32 --pixel-size 4 --train 2 --test 1 --budget-s 0.2 --no-topaz --panel-crop 24)
  toy_step=(--batch 1 --size 64 --steps 2)
  toy_denoise=(--size 96 --count 2 --repeats 1 --tile 64)
  [ -z "${NETS:-}" ] && nets="unet:2,3 unet:2,3+residual"
fi

if [ "$stage" != speed ]; then
  # shellcheck disable=SC2086
  timeout "$(left)" python3 bench/quality.py --budget-s "${BUDGET_S:-70}" --nets $nets \
      --optimizer adam --compile-first --device "$device" --out "$out/quality" "${toy_quality[@]}" \
      > "$out/quality.txt" 2>&1
  status quality $? "$out/quality.txt"
  # with time left, the tests' kernels too, for a speed call on this machine while it is warm
  [ "$device" = gpu ] && [ "$stage" = quality ] && [ "$(left)" -gt 100 ] && precompile_tests
fi

if [ "$stage" != quality ] && [ "${FIGURES:-1}" != 0 ]; then
  timeout "$(left)" python3 bench/step.py --preset unets --device "$device" \
      --json "$out/step.json" "${toy_step[@]}" > "$out/step.txt" 2>&1
  status step $? "$out/step.txt"
  timeout "$(left)" python3 bench/denoise.py --preset unets --device "$device" --count 8 \
      --repeats 1 --json "$out/denoise.json" "${toy_denoise[@]}" > "$out/denoise.txt" 2>&1
  status denoise $? "$out/denoise.txt"
fi

if [ "$stage" != quality ]; then
  [ "$device" = gpu ] && [ "${TESTS:-1}" != 0 ] && precompile_tests
  # file|marker|-k expression: the large step cases one a process (the reference's speed bounds
  # them), the rest of each file in two
  groups=("tests/test_unet_step.py||512x768"
          "tests/test_unet_step.py||adam-residual-odd"
          "tests/test_unet_step.py||48-wide"
          "tests/test_unet_step.py||not (test_gpu_steps_equal_reference and not small)"
          "tests/test_n2n_unet.py|gpu|"
          "tests/test_unet_ops.py|gpu|conv"
          "tests/test_unet_ops.py|gpu|not conv"
          "tests/test_kernels.py|gpu|")
  pids=()
  [ "${TESTS:-1}" = 0 ] && groups=()
  for i in "${!groups[@]}"; do
    IFS='|' read -r file marker expr <<< "${groups[$i]}"
    args=(-q -rs -p no:cacheprovider "$file" -k "$expr")
    [ -n "$marker" ] && args+=(-m "$marker")
    if [ "$device" = gpu ]; then
      timeout "$(( $(left) - 15 ))" python3 -m pytest "${args[@]}" > "$out/pytest_$i.txt" 2>&1 &
    else
      python3 -m pytest --collect-only "${args[@]}" > "$out/pytest_$i.txt" 2>&1 &
    fi
    pids+=($!)
  done
  # racecheck a case at a time (a case takes it 1-3 minutes warm), so that a call cut short
  # keeps the verdicts of the cases it finished
  for tool in ${TOOLS-memcheck racecheck initcheck}; do
    runs=("")
    [ "$tool" = racecheck ] && [ "$device" = gpu ] && runs=(${RACECHECK_CASES:-0 1 2})  # sanitize_unet.CASES
    for case in "${runs[@]}"; do
      name=sanitizer_$tool${case:+_$case}
      if [ "$device" = gpu ]; then
        timeout "$(( $(left) - 15 ))" compute-sanitizer --tool $tool --error-exitcode 9 \
            python3 bench/sanitize_unet.py ${case:+--cases $case} > "$out/$name.txt" 2>&1
        rc=$?
        echo "$(grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY' "$out/$name.txt" | tail -1)" >> "$out/$name.txt"
      else
        python3 bench/sanitize_unet.py --device cpu > "$out/$name.txt" 2>&1; rc=$?
      fi
      status "$name" $rc "$out/$name.txt"
    done
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    status "pytest_$i" $rc "$out/pytest_$i.txt" "${groups[$i]}"   # exit 5: it selected no test
  done
fi
echo "stages took $(( SECONDS - start )) s"
python3 bench/unet_summary.py "$out"
