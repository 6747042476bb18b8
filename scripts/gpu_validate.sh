#!/usr/bin/env bash
# Everything the CPU cannot check, in device calls of under 10 minutes each (run from the
# repository root on a CUDA machine; packages missing there travel as wheels, see README):
#
#   OUT=<dir> bash scripts/gpu_validate.sh tests     # the GPU test suite, model smoke    (~5 min)
#   OUT=<dir> bash scripts/gpu_validate.sh optin     # kernel tests with opt-out decodes  (~5 min)
#   OUT=<dir> bash scripts/gpu_validate.sh bench     # bench_attention, joint table on/off (~5 min)
#   OUT=<dir> bash scripts/gpu_validate.sh sweep     # decode launch-parameter sweep      (~3 min)
#   OUT=<dir> bash scripts/gpu_validate.sh sweep2    # launches x MMA (polar-4) / shuffles (d 64) (~4 min)
#   OUT=<dir> bash scripts/gpu_validate.sh encode    # encode tests, encode launch sweep  (~4 min)
#   OUT=<dir> bash scripts/gpu_validate.sh store     # encode sweep of the code stores, and the
#       encode tests with the record and the strided stores beside the default record16 (~9 min)
#   OUT=<dir> bash scripts/gpu_validate.sh persist   # encode sweep of the persistent launch, and
#       the encode tests with it off and on everywhere (~7 min)
#   OUT=<dir> bash scripts/gpu_validate.sh joint12   # kernel tests with the joint table everywhere (~2 min)
#   OUT=<dir> bash scripts/gpu_validate.sh profile   # ncu of attention, dequant, encode  (~2 min)
#   OUT=<dir> bash scripts/gpu_validate.sh mma       # kq tests, decode bench of each MMA orientation (~8 min)
#   OUT=<dir> bash scripts/gpu_validate.sh profile_gluon   # ncu of the Gluon decode, default
#       (staged codes) and the register prefetch (~2 min)
#   OUT=<dir> bash scripts/gpu_validate.sh profile_detail  # attention, encode per SASS instruction (~2 min)
#   OUT=<dir> bash scripts/gpu_validate.sh profile_encode  # the encode alone, per SASS
#       instruction, with the pipes and schedulers (~1.5 min)
#   OUT=<dir> bash scripts/gpu_validate.sh shfl      # tests + decode bench, shuffle tables on/off (~6 min)
#   OUT=<dir> bash scripts/gpu_validate.sh compile   # compiled vs eager model decode step (~6 min)
#   OUT=<dir> bash scripts/gpu_validate.sh ab        # the working tree's decode / encode
#       timed against each revision under _ab/ in one process (make them here with
#       `python3 scripts/ab_kernels.py --snapshot REV`, carry _ab; ~5 min)
#   OUT=<dir> bash scripts/gpu_validate.sh gluon     # the Gluon decode's tests, then the A/B
#       of its variants against the Triton kernel and cuDNN (scripts/ab_gluon_decode.py;
#       at most ~6 min)
#   OUT=<dir> bash scripts/gpu_validate.sh gluon_encode  # the encode sweep at d 128 (the Gluon
#       encode's launches beside the Triton kernel and its TMA loads), then the Gluon encode's
#       tests (~4 min)
#   OUT=<dir> bash scripts/gpu_validate.sh resume    # the encode at five launches, the Gluon
#       encode's tests, then the whole suite, in one call of CALL_S (560) seconds
#   OUT=<dir> bash scripts/gpu_validate.sh halves    # the encode's column halves and three
#       warpgroups timed beside the default, then the Gluon encode's tests (~2.5 min)
#   OUT=<dir> bash scripts/gpu_validate.sh explore   # an encode sweep at d 128, the gluon A/B
#       without its tests and profile_encode in one call (~8-9 min)
#   OUT=<dir> bash scripts/gpu_validate.sh gluon_bench  # the gluon stage, then bench_attention
#       with the faster of the default and POLARTENSOR_GLUON_STAGGER=1 (~8 min)
#   OUT=<dir> bash scripts/gpu_validate.sh gluon_forced  # attention and integration tests
#       with Gluon forced on: its transposed step off, then two steps an iteration on (~8 min)
#   OUT=<dir> bash scripts/gpu_validate.sh staged    # the Gluon decode's tests, then the A/B
#       of its codes staged in shared memory (POLARTENSOR_GLUON_STAGED) beside the default
#       and the loop without the prefetch (~6 min)
#   OUT=<dir> bash scripts/gpu_validate.sh release   # bench, ncu of the Gluon decode's
#       default, its tests and the buffers', then the rest of the suite, in CALL_S (570) s
#   OUT=<dir> bash scripts/gpu_validate.sh ab_tests  # each _ab/ revision's own kernel tests
#       (up to ~4.5 min a revision: one or two per call; 180 s cut both off on an H100)
#
# Every step writes its log under $OUT as it goes, so a step cut off by a time limit still
# leaves what it did. summary.txt lists each step with its exit status.
set -u
stage=${1:?usage: OUT=<dir> bash scripts/gpu_validate.sh tests|optin|bench|sweep|sweep2|encode|store|persist|joint12|mma|shfl|profile|profile_gluon|profile_encode|profile_detail|compile|ab|gluon|explore|gluon_bench|gluon_forced|gluon_encode|resume|halves|staged|release|ab_tests}
OUT=${OUT:-gpu_validate_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # (absolute: some stages run steps from other folders)
PY=${PYTHON:-python3}
step() {  # step <name> <timeout seconds> <command...>
    local name=$1 limit=$2
    shift 2
    echo "== $(date -u +%H:%M:%S) $name: $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name exit $rc ($(tail -n 1 "$OUT/$name.log"))" | tee -a "$OUT/summary.txt"
}
"$PY" - <<'PY' | tee -a "$OUT/summary.txt"
import platform, torch, triton
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
      f"Python {platform.python_version()}")
PY
# pytest-xdist, where installed, spreads the tests over the CPU cores: Triton compiles on them.
# --dist loadgroup: the tests marked with one xdist_group (those sharing an expensive module
# fixture, such as the Gluon traces) run on one worker, which builds the fixture once.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null \
    && XDIST=(-n "$(( $(nproc) > 14 ? 14 : $(nproc) ))" --dist loadgroup)
bench_all() {  # <budget seconds>: bench_attention, every table (the bench and release stages)
    step bench 330 "$PY" scripts/bench_attention.py --out "$OUT/bench" --budget-s "$1" \
        --presets paper,polar-3,polar-4,polar-4/polar-3 --joint12
}
# Nsight Compute of the Gluon decode at batch 8 / 32K, paper (the target shape), one launch
# (the profile_gluon and release stages)
NCU_GLUON=(ncu --clock-control none --section SpeedOfLight --section WarpStateStats
           --section InstructionStats --section LaunchStats --section Occupancy
           --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis
           --section SchedulerStats --section SourceCounters --print-details all
           -k regex:polar_decode_attn_gluon --launch-skip 1 -c 1 "$PY" scripts/profile_decode.py)
ab_gluon_candidates() {
    # the Gluon decode's A/B: the default beside the candidates with more work in flight per
    # warp: 32 keys a step without the prefetch, 255 registers offline, 588 loop
    # instructions per 16 keys; 32 keys staggered, 254 and 616; 16 keys without the prefetch
    # at 12 per SM, 168 and 613; the default 230 and 674
    step ab_gluon 230 "$PY" scripts/ab_gluon_decode.py --out "$OUT/gluon" --budget-s 170 \
        --shapes 8:32768,16:32768,8:131072,32:8192,4:65536,8:16384 \
        --variants 16:0:pf:tr:kp:ls@8,32:0:tr:kp:ls@8,32:0:pf:tr:kp:ls:sg@8,16:0:tr:kp:ls@12
}
gluon_encode_steps() {  # <tests limit s> <sweep limit s> <launches>: the encode sweep at
    # d 128, paper (the Gluon encode's scope), the given launches beside the default, then
    # the Gluon encode's tests (kernels/encode_gluon.py: code bytes and radii equal to the
    # Triton encode's; spread over the cores, as its offline builds take ~15-30 s each)
    OUT="$OUT" step encode_sweep "$2" "$PY" scripts/sweep_encode_launch.py \
        --models llama3.1-8b --presets paper --launches "$3"
    POLARTENSOR_FAILLOG="$OUT/failures_encode_gluon.txt" \
        step tests_encode_gluon "$1" "$PY" -m pytest "${XDIST[@]}" -q -rs -p no:cacheprovider \
        tests/kernels/test_encode_gluon.py
}
case "$stage" in
tests)
    # the asset tests need the package registry, which a GPU machine may not reach;
    # failures and per-test times are written as tests finish (tests/conftest.py), and a test
    # running past 240 s dumps every thread's stack into the log; TESTS_LIMIT (seconds,
    # default 480) shortens the pytest step where it follows another stage in one call
    POLARTENSOR_FAILLOG="$OUT/failures.txt" POLARTENSOR_TESTLOG="$OUT/test_times.txt" \
        step tests "${TESTS_LIMIT:-480}" "$PY" -m pytest "${XDIST[@]}" -q -rs -p no:cacheprovider \
        -o faulthandler_timeout=240 tests --deselect tests/test_assets.py
    step smoke 60 "$PY" scripts/gpu_smoke.py
    ;;
optin)
    # the kernels' tests with the opt-out tile decodes (the default runs in the tests stage):
    # POLARTENSOR_DECODE=joined (float32 decode for every dtype) and =reshape, then byte code
    # loads (POLARTENSOR_CODE16=0), then float32 upper levels
    for dec in joined reshape; do
        POLARTENSOR_DECODE=$dec POLARTENSOR_FAILLOG="$OUT/failures_$dec.txt" \
            step "tests_${dec}_decode" 200 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
            tests/kernels/test_kernel_attention.py tests/kernels/test_tree_decode.py
    done
    POLARTENSOR_CODE16=0 POLARTENSOR_FAILLOG="$OUT/failures_code16_0.txt" \
        step tests_code16_0 150 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_kernel_attention.py tests/kernels/test_tree_decode.py
    # float32 upper levels in the packed decode (POLARTENSOR_DECODE_UPPER=float32)
    POLARTENSOR_DECODE_UPPER=float32 POLARTENSOR_FAILLOG="$OUT/failures_upper_f32.txt" \
        step tests_upper_float32 150 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_kernel_attention.py tests/kernels/test_tree_decode.py
    ;;
bench)
    # every table, with the joint table of levels 1 and 2 forced on (POLARTENSOR_JOINT12=1) and
    # off (=0) timed beside the default (on where measured faster), in one run; polar-4/polar-3
    # is the transformers integration's default cache (polar-4 keys, polar-3 values)
    bench_all 250
    ;;
sweep)
    OUT="$OUT" step sweep 280 "$PY" scripts/sweep_decode_launch.py
    ;;
sweep2)
    # what the 2026-12-05 defaults left unmeasured: polar-4 at d 128 (qk by default) with vp,
    # which with the shuffles would take 128 keys under a 168 cap; and d 64 (SmolLM2) with
    # the shuffles, which are off there, under each launch
    OUT="$OUT" step sweep2_polar4 250 "$PY" scripts/sweep_decode_launch.py \
        --presets polar-4 --env POLARTENSOR_DECODE_MMA=qk,vp \
        --shapes llama3.1-8b:1:32768,llama3.1-8b:8:32768,llama3.1-8b:8:131072,llama3.1-8b:32:32768 \
        --settings default,64:4:128,128:4:168
    mv "$OUT/decode_launch_sweep.json" "$OUT/sweep2_polar4.json"
    OUT="$OUT" step sweep2_d64 200 "$PY" scripts/sweep_decode_launch.py \
        --presets paper,polar-3,polar-4 --env POLARTENSOR_DECODE_SHFL=unset,1 \
        --shapes smollm2-135m:8:32768,smollm2-135m:32:32768 \
        --settings default,128:4:128,128:4:168,64:4:128
    mv "$OUT/decode_launch_sweep.json" "$OUT/sweep2_d64.json"
    ;;
encode)
    # the encode kernel's tests at the default launch, then rows per program x warps x
    # register caps timed against the default (each launch's codes and radii checked equal
    # to the default's)
    POLARTENSOR_FAILLOG="$OUT/failures_encode.txt" \
        step tests_encode 280 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_kernel_encode.py
    OUT="$OUT" step encode_sweep 300 "$PY" scripts/sweep_encode_launch.py
    ;;
store)
    # the code stores (POLARTENSOR_ENCODE_STORE): the default (record16 at every head_dim)
    # timed against record, the strided stores (the former default), whole records, the
    # former 64-row launch, 128 rows and 8 warps (polar-4 ran 0.76x there with record16 on
    # 2026-12-06), the persistent launch (S loaded once per program, x copied ahead through
    # 1-3 stages; the default at d 128 for paper and polar-3 since 2026-12-06, see the
    # persist stage), and the preset with rotation="permuted_hadamard" (one exact MMA), codes
    # and radii checked equal to the default's (not that row's: another rotation); then the
    # encode's tests with the record and the strided stores everywhere (whole passed on the
    # GPU on 2026-12-06)
    OUT="$OUT" step store_sweep 240 "$PY" scripts/sweep_encode_launch.py \
        --models llama3.1-8b,smollm2-135m --presets paper,polar-3,polar-4 \
        --launches bn64_w4,default_store_strided,default_store_record,default_store_whole,default_permuted_hadamard,bn128_w8,default_persist_s1,default_persist_s2,default_persist_s3
    for e in json md; do mv "$OUT/encode_launch_sweep.$e" "$OUT/store_sweep_d64_d128.$e"; done
    OUT="$OUT" step store_sweep_d256 120 "$PY" scripts/sweep_encode_launch.py \
        --models gemma2-9b --presets paper,polar-3,polar-4 \
        --launches default_store_strided,default_store_record,default_permuted_hadamard
    for e in json md; do mv "$OUT/encode_launch_sweep.$e" "$OUT/store_sweep_d256.$e"; done
    for st in record strided; do
        POLARTENSOR_ENCODE_STORE=$st POLARTENSOR_FAILLOG="$OUT/failures_store_$st.txt" \
            step "tests_store_$st" 200 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
            tests/kernels/test_kernel_encode.py
    done
    ;;
persist)
    # the persistent encode (the default at d 128 where every level has <= 4 bits: 128 rows,
    # 8 warps, a 128-register cap) timed against one program per tile at the default launch
    # (the default before), 64-row persistent programs with two stages, 128-row ones
    # uncapped (one per SM) and the one-MMA permuted Hadamard rotation; then the encode's
    # tests with one program per tile everywhere (POLARTENSOR_ENCODE_PERSIST=0) and with
    # the persistent launch wherever it applies (=1)
    OUT="$OUT" step persist_sweep 200 "$PY" scripts/sweep_encode_launch.py \
        --models llama3.1-8b,smollm2-135m --presets paper,polar-3,polar-4 \
        --launches default_per_tile,default_persist_s2,bn128_w8_persist_s1_1per_sm,default_permuted_hadamard
    for e in json md; do mv "$OUT/encode_launch_sweep.$e" "$OUT/persist_sweep.$e"; done
    for p in 0 1; do
        POLARTENSOR_ENCODE_PERSIST=$p POLARTENSOR_FAILLOG="$OUT/failures_persist_$p.txt" \
            step "tests_persist_$p" 200 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
            tests/kernels/test_kernel_encode.py
    done
    ;;
profile_gluon)
    # Nsight Compute on the Gluon decode (NCU_GLUON): its default launch (the codes staged
    # in shared memory), then the register prefetch (POLARTENSOR_GLUON_STAGED=0); the pipes
    # and the L1 wavefronts say whether the shuffles and the code reads (both on the LSU/MIO
    # path) or the issue rate cap it, SourceCounters which instructions stall
    GLUON=1 step ncu_gluon 200 "${NCU_GLUON[@]}"
    GLUON=1 POLARTENSOR_GLUON_STAGED=0 step ncu_gluon_prefetch 200 "${NCU_GLUON[@]}"
    ;;
release)
    # one call where device time is short: the benchmark (the bench stage), Nsight Compute of
    # the Gluon decode's default (staged codes) at the target, then the Gluon decode's and the
    # KV buffers' tests, then the rest of the suite in what is left of CALL_S (default 570)
    # seconds since the stage began; SKIP_NCU=1 leaves Nsight Compute out (more time for the
    # suite where device time is shorter still)
    bench_all 230
    [ -n "${SKIP_NCU:-}" ] || GLUON=1 step ncu_gluon 150 "${NCU_GLUON[@]}"
    POLARTENSOR_FAILLOG="$OUT/failures_gluon.txt" \
        step tests_gluon 170 "$PY" -m pytest "${XDIST[@]}" -q -rs -p no:cacheprovider \
        tests/kernels/test_decode_attention_gluon.py tests/test_kv_buffer.py
    POLARTENSOR_FAILLOG="$OUT/failures.txt" POLARTENSOR_TESTLOG="$OUT/test_times.txt" \
        step tests $(( ${CALL_S:-570} - SECONDS > 40 ? ${CALL_S:-570} - SECONDS - 10 : 30 )) \
        "$PY" -m pytest "${XDIST[@]}" -q -rs -p no:cacheprovider tests \
        --deselect tests/test_assets.py --ignore tests/kernels/test_decode_attention_gluon.py \
        --ignore tests/test_kv_buffer.py
    ;;
mma)
    # the MMA orientations (POLARTENSOR_DECODE_MMA): the kernels' tests with kq forced (the
    # default, auto, runs kq only at d 64), then the decode table with qk, vp and kq timed
    # beside the default, same run
    POLARTENSOR_DECODE_MMA=kq POLARTENSOR_FAILLOG="$OUT/failures_mma_kq.txt" \
        step tests_mma_kq 250 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_kernel_attention.py tests/kernels/test_tree_decode.py
    step bench_mma 300 "$PY" scripts/bench_attention.py --out "$OUT/bench" --budget-s 230 \
        --presets paper,polar-3,polar-4 --sections decode --decode-mma
    ;;
shfl)
    # the per-level tables read by warp shuffles (the default at d 128 where measured faster):
    # the kernels' tests with them everywhere (POLARTENSOR_DECODE_SHFL=1, beside the joint
    # table too), then the decode table with =1 and =0 timed beside the default
    POLARTENSOR_DECODE_SHFL=1 POLARTENSOR_FAILLOG="$OUT/failures_shfl.txt" \
        step tests_shfl 200 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_kernel_attention.py tests/kernels/test_tree_decode.py
    step bench_shfl 300 "$PY" scripts/bench_attention.py --out "$OUT/bench" --budget-s 230 \
        --presets paper,polar-3,polar-4 --sections decode --shfl
    ;;
joint12)
    # the kernels' tests with the joint table of levels 1 and 2 wherever a configuration has
    # one (the default takes it only where the H200 measured it faster)
    POLARTENSOR_JOINT12=1 POLARTENSOR_FAILLOG="$OUT/failures_joint12.txt" \
        step tests_joint12 150 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_kernel_attention.py tests/kernels/test_tree_decode.py
    ;;
gluon)
    # the Gluon decode (kernels/decode_attention_gluon.py): its tests, then the A/B of its
    # launches against the Triton kernel and cuDNN at Llama heads (outputs compared first)
    POLARTENSOR_FAILLOG="$OUT/failures_gluon.txt" \
        step tests_gluon 150 "$PY" -m pytest -q -p no:cacheprovider \
        tests/kernels/test_decode_attention_gluon.py
    ab_gluon_candidates
    ;;
gluon_encode)
    # the encode: the default (the Gluon encode, 64-row tiles, staged stores) beside the
    # Triton kernel, its TMA loads and the Gluon encode's unstaged stores, other tiles and
    # ring depths, then the Gluon encode's tests (~4 min)
    gluon_encode_steps 150 170 default_triton,default_gluon64_unstaged,default_gluon128,default_gluon64_b3,default_gluon64_b3_2per_sm_unstaged,default_gluon128_b3,default_persist_s1_tma
    ;;
resume)
    # one call for the Gluon encode on a GPU it has not met (the H200): the encode at the
    # launches nearest the target (the default, the Gluon encode at 64-row tiles with staged
    # stores, beside its unstaged stores, a third buffer at two programs per SM unstaged, the
    # Triton kernel and its TMA loads, three warpgroups in column halves), its tests, then
    # the whole suite in what is left of CALL_S (default 560) seconds since the stage began
    gluon_encode_steps 150 110 default_triton,default_gluon64_unstaged,default_gluon64_b3_2per_sm_unstaged,default_persist_s1_tma,default_gluon64_1per_sm_halves_g3
    OUT="$OUT/suite" TESTS_LIMIT=$(( ${CALL_S:-560} - SECONDS - 60 )) bash "$0" tests
    ;;
staged)
    # the codes staged in shared memory by cp.async (168 registers offline, 579 loop
    # instructions a step, 8 KB of ring: 12 programs per SM; 128 under a cap, 629, 16 per SM)
    # beside the default (230, 674, 8 per SM) and the same loop loading its own codes (168,
    # 613, 12 per SM), after the Gluon decode's tests (the hypothesis test draws it)
    POLARTENSOR_FAILLOG="$OUT/failures_gluon.txt" \
        step tests_gluon 170 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_decode_attention_gluon.py
    step ab_gluon 260 "$PY" scripts/ab_gluon_decode.py --out "$OUT/gluon" --budget-s 200 \
        --shapes 8:32768,16:32768,8:131072,32:8192,4:65536 \
        --variants 16:0:pf:tr:kp:ls@8,16:0:tr:kp:ls@12,16:0:tr:kp:ls:st@12,16:128:tr:kp:ls:st@16
    ;;
halves)
    # the column halves (POLARTENSOR_ENCODE_GLUON_HALVES=1) at 64 and 128 rows and three
    # warp-specialized warpgroups sharing S (GROUPS=3) beside the default and the Triton
    # kernel, then the Gluon encode's tests, which draw both (~2.5 min)
    gluon_encode_steps 150 90 default_triton,default_gluon64_halves,default_gluon128_halves,default_gluon64_1per_sm_halves_g3
    ;;
explore)
    # one device call for three measurements, the encode first: the encode on this GPU at
    # the launches nearest the target (the default, the Gluon encode, beside the Triton
    # kernel and the Gluon encode's other tiles and ring depths, x asked of L2 one or
    # two tiles ahead, x by TMA at five launches, the one-MMA rotation without and with the
    # L2 prefetch), the gluon stage's A/B without its tests (the tests stage runs them), and
    # the profile_encode stage
    OUT="$OUT" step encode_sweep 200 "$PY" scripts/sweep_encode_launch.py \
        --models llama3.1-8b --presets paper,polar-3,polar-4 \
        --launches default_triton,default_gluon128,default_gluon64_b3,default_gluon128_b3,default_persist_l2pf1,default_persist_l2pf2,default_persist_s1_tma,default_persist_s1_tma_l2pf1,bn64_w4_persist_s2_2per_sm_tma,bn64_w4_persist_s2_2per_sm_tma_l2pf1,bn128_w8_persist_s3_1per_sm_tma,default_permuted_hadamard,default_persist_l2pf1_permuted_hadamard
    ab_gluon_candidates
    OUT="$OUT/enc" bash "$0" profile_encode
    ;;
gluon_bench)
    # the gluon stage, then the full benchmark with the launch the A/B found faster at the
    # target (batch 8 / 32K): the prefetch half a step ahead at 12 per SM
    # (POLARTENSOR_GLUON_STAGGER=1) or the default; one device call for both
    POLARTENSOR_FAILLOG="$OUT/failures_gluon.txt" \
        step tests_gluon 150 "$PY" -m pytest -q -p no:cacheprovider \
        tests/kernels/test_decode_attention_gluon.py
    step ab_gluon 200 "$PY" scripts/ab_gluon_decode.py --out "$OUT/gluon" --budget-s 120 \
        --shapes 8:32768,16:32768,8:131072,32:8192,4:65536 \
        --variants 16:0:pf:tr:kp:ls@8,16:0:pf:tr:kp:ls:sg@12,16:0:pf:pr:kp:ls@8,16:0:pf:kp:ls:sg@8
    if "$PY" - "$OUT/gluon/ab_gluon_decode.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"]
        if (r["batch"], r["context"]) == (8, 32768)]
ms = rows[0]["ms"] if rows else {}
sg, base = ms.get("gluon_bn16_cap0_ps12_pf_tr_kp_ls_sg"), ms.get("gluon_bn16_cap0_ps8_pf_tr_kp_ls")
print(f"stagger at 12 per SM {sg}, default {base}")
sys.exit(0 if sg and base and sg < base else 1)
PY
    then
        export POLARTENSOR_GLUON_STAGGER=1
    fi
    echo "POLARTENSOR_GLUON_STAGGER=${POLARTENSOR_GLUON_STAGGER:-unset}" | tee -a "$OUT/summary.txt"
    step bench 300 "$PY" scripts/bench_attention.py --out "$OUT/bench" --budget-s 140 \
        --presets paper,polar-3,polar-4,polar-4/polar-3
    ;;
gluon_forced)
    # the attention and integration tests with Gluon forced on, first with its transposed
    # step (the default for groups <= 8) off, then with two steps an iteration (opt-in) on
    # (the Triton-launch tests pin the Triton kernel; 150 s cut one such run off at ~90% on
    # an H100)
    POLARTENSOR_DECODE_GLUON=1 POLARTENSOR_GLUON_TRANS=0 \
        POLARTENSOR_FAILLOG="$OUT/failures_gluon_untransposed.txt" \
        step tests_gluon_untransposed 240 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_decode_attention_gluon.py tests/kernels/test_kernel_attention.py \
        tests/integrations
    POLARTENSOR_DECODE_GLUON=1 POLARTENSOR_GLUON_PAIRS=1 \
        POLARTENSOR_FAILLOG="$OUT/failures_gluon_pairs.txt" \
        step tests_gluon_pairs 240 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
        tests/kernels/test_decode_attention_gluon.py tests/kernels/test_kernel_attention.py \
        tests/integrations
    ;;
profile)
    # Nsight Compute on one launch each of attention, dequant and encode (where time goes);
    # the encode runs first in profile_decode.py, so it gets its own filter. The compute
    # section's pipe utilization says which pipe caps the decode's issue rate (the split
    # sweep found three programs per SM only ~1.1x as fast as two: docs/kernel_history.md)
    NCU=(ncu --clock-control none --section SpeedOfLight --section WarpStateStats
         --section InstructionStats --section LaunchStats --section Occupancy
         --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis
         --print-details all)
    step ncu_attention 300 "${NCU[@]}" -k regex:"polar_(decode_attn_fwd|dequant)" -c 2 \
        "$PY" scripts/profile_decode.py
    step ncu_encode 200 "${NCU[@]}" -k regex:polar_encode --launch-skip 2 -c 1 \
        "$PY" scripts/profile_decode.py
    ;;
profile_encode)
    # the encode alone (paper, d 128, batch 8 / 32K, its default launch: on sm_90 the Gluon
    # encode with staged stores), per SASS instruction, with the pipes and schedulers
    # (results/bench/ncu_gluon_encode_2026-12-07b_h100.md the last such profile)
    step ncu_encode_detail 200 ncu --clock-control none --section MemoryWorkloadAnalysis_Tables \
        --section SourceCounters --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        --section InstructionStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        --import-source no -o "$OUT/encode" -k regex:polar_encode --launch-skip 2 -c 1 \
        "$PY" scripts/profile_decode.py
    step ncu_encode_details 100 ncu -i "$OUT/encode.ncu-rep" --page details --print-details all
    step ncu_encode_source 100 ncu -i "$OUT/encode.ncu-rep" --page source --csv \
        --print-source sass
    ;;
profile_detail)
    # the attention kernel alone, per SASS instruction: which loads make the L1/TEX traffic
    # (requests, sectors and wavefronts per instruction), from a saved Nsight Compute report
    step ncu_detail 300 ncu --clock-control none --section MemoryWorkloadAnalysis_Tables \
        --section SourceCounters --section SpeedOfLight --section WarpStateStats \
        --import-source no -o "$OUT/attention" -k regex:polar_decode_attn_fwd -c 1 \
        "$PY" scripts/profile_decode.py
    step ncu_detail_details 120 ncu -i "$OUT/attention.ncu-rep" --page details \
        --print-details all
    step ncu_detail_source 120 ncu -i "$OUT/attention.ncu-rep" --page source --csv \
        --print-source sass
    # the same for the encode (it launches first in profile_decode.py)
    step ncu_encode_detail 300 ncu --clock-control none --section MemoryWorkloadAnalysis_Tables \
        --section SourceCounters --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats --import-source no -o "$OUT/encode" \
        -k regex:polar_encode --launch-skip 2 -c 1 "$PY" scripts/profile_decode.py
    step ncu_encode_details 120 ncu -i "$OUT/encode.ncu-rep" --page details --print-details all
    step ncu_encode_source 120 ncu -i "$OUT/encode.ncu-rep" --page source --csv \
        --print-source sass
    ;;
ab|ab_tests)
    REVS=()
    for dir in _ab/*/; do
        [ -d "$dir/polartensor" ] && REVS+=("${dir%/}")
    done
    [ ${#REVS[@]} -gt 0 ] || { echo "no revisions under _ab/: make them with" \
        "python3 scripts/ab_kernels.py --snapshot REV and carry _ab" >&2; exit 2; }
    if [ "$stage" = ab ]; then
        ARGS=()
        for dir in "${REVS[@]}"; do ARGS+=(--rev "$(basename "$dir")=$dir"); done
        step ab 420 "$PY" scripts/ab_kernels.py "${ARGS[@]}" --out "$OUT/ab"
    else
        # each revision's kernel tests against its own package (first on the path)
        for dir in "${REVS[@]}"; do
            name=$(basename "$dir")
            (cd "$dir" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
                POLARTENSOR_FAILLOG="$OUT/failures_$name.txt" \
                step "tests_$name" 280 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider \
                tests/kernels/test_kernel_attention.py tests/kernels/test_tree_decode.py \
                tests/kernels/test_kernel_encode.py)
        done
    fi
    ;;
compile)
    step compile 560 "$PY" scripts/gpu_compile_check.py --fullgraph --dtypes bfloat16
    ;;
*)
    echo "unknown stage $stage: see the list at the top of this script" >&2
    exit 2
    ;;
esac
