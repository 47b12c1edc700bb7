# GPU machine, full TVM bundle in .device: the decompressed prefill with Q's fragments in
# registers (MMAConfig.q_regs) against the current configs and cuDNN.
source benchmarks/device_env.sh; export OUT
timeout 240 python3 -m pytest -q -m gpu tests/test_attention_prefill.py -k "every_candidate and decompressed and qreg" -x -p no:cacheprovider 2>&1 | tail -4
timeout 330 python3 benchmarks/bench_attention.py --kinds decompressed --n 2048,8192,16384 --baselines sdpa-cudnn --all-configs --configs 0,1,3,11,12 --out $OUT/bench_attention_h200_dec_qregs.json 2>&1 | tail -22
