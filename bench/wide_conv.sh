#!/usr/bin/env bash
# Wide convolutions on the GPU (forward and backward-data staging their weights in groups of
# input channels, NOTES v30): their parity tests, then their speed. Each kernel compiles in
# about 20 s on the device, one process each: first every test case and every timed kernel
# compiles side by side (the timing runs at a tiny size only to fill the disk cache), then
# the timing runs alone on a quiet GPU. Then the wide kernels' variants (tune_conv.py --parts
# wide, NOTES v34: the next channel's loads early, geometry (8, 16, 1)) against their defaults.
# Logs go to ${OUT:-/tmp/wide_conv}.
set -u
out=${OUT:-/tmp/wide_conv}; mkdir -p "$out"
nvidia-smi -L
shapes=(96x96 144x96 97x64 192x192)
widths=(48 96 144)
tests=("wide_layers_forward_and_backward_data and 1x48x48" "wide_layers_forward_and_backward_data and 2x96x48"
       "wide_layers_forward_and_backward_data and 1x64x128" "wide_layers_forward_and_backward_data and 1x144x96"
       "wide_layers_forward_and_backward_data and 1x256x256" "wide_layers_forward_and_backward_data and 1x97x64"
       "wide_layers_forward_and_backward_data and 1x64x192"
       "groups or shared or refused" "test_conv_leaky_kernels_equal_reference or two_inputs"
       "48-wide"         # whole U-Net steps: their concatenation 48+48 -> 48 is a grouped one
       "early_loads")
pids=()
for i in "${!tests[@]}"; do
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_unet_ops.py \
    tests/test_unet_step.py -k "${tests[$i]}" > "$out/pytest_$i.txt" 2>&1 &
  pids+=($!)
done
for shape in "${shapes[@]}"; do
  python3 bench/tune_conv.py --parts channel-groups --wide-shapes "$shape" --batch 1 --size 64 \
    > /dev/null 2>&1 &
done
for width in "${widths[@]}"; do
  python3 bench/kernels.py --unet-only --widths "$width" --batches 1x64 > /dev/null 2>&1 &
done
for kernel in "forward 48->48" "48+48->48" "backward-data" "16->16"; do
  python3 bench/tune_conv.py --parts wide --wide-kernels "$kernel" --batch 1 --size 64 \
    > /dev/null 2>&1 &
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; echo "pytest ${tests[$i]}: exit $?  $(tail -1 "$out/pytest_$i.txt")"
done
wait
python3 bench/tune_conv.py --parts channel-groups --wide-shapes "${shapes[@]}" 2>&1 \
  | tee "$out/channel_groups.txt"
python3 bench/kernels.py --unet-only --widths "${widths[@]}" 2>&1 | tee "$out/kernels.txt"
python3 bench/tune_conv.py --parts wide 2>&1 | tee "$out/wide_variants.txt"
