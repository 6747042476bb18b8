"""scripts/smem_bank_conflicts.py predicts shared-memory wavefronts from PTX: checked on
hand-written PTX whose conflicts are known."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import smem_bank_conflicts as sbc  # noqa: E402

_HEAD = """
.extern .shared .align 16 .b8 global_smem[];
.visible .entry k()
{
\tmov.u32 \t%r1, %tid.x;
\tmov.b32 \t%r2, global_smem;
"""


def _sites(body: str, warps: int = 2) -> list[dict]:
    return sbc.analyse(_HEAD + body + "\n\tret;\n}\n", warps)


def test_vector_stores_conflict_free_and_two_way():
    rows = _sites("""
\tshl.b32 \t%r3, %r1, 4;
\tadd.s32 \t%r4, %r2, %r3;
\tst.shared.v4.b32 \t[%r4], {%r5, %r6, %r7, %r8};
\tshl.b32 \t%r9, %r1, 5;
\tst.shared.v4.b32 \t[%r9+16], {%r5, %r6, %r7, %r8};
\tshl.b32 \t%r10, %r1, 2;
\tld.shared.b32 \t%r11, [%r10];
\tand.b32 \t%r12, %r1, 0;
\tld.shared.b32 \t%r13, [%r12];
""")
    got = [(r["instr"], r["wavefronts"], r["ideal"]) for r in rows]
    assert got == [("st.shared.v4.b32", 4.0, 4.0),   # 32 x 16 contiguous bytes
                   ("st.shared.v4.b32", 8.0, 4.0),   # 32-byte stride: half the banks
                   ("ld.shared.b32", 1.0, 1.0),      # 32 consecutive words
                   ("ld.shared.b32", 1.0, 1.0)]      # one word for every lane: broadcast


def test_ldmatrix_rows_with_and_without_swizzle():
    # row r = lane % 8 of matrix lane // 8 at r * 256 bytes: plain rows hit one 16-byte bank
    # group 8 times (8 wavefronts a matrix); XOR-swizzling the 16-byte chunk by r spreads
    # them over all 8 groups (1 a matrix)
    rows = _sites("""
\tand.b32 \t%r3, %r1, 7;
\tshl.b32 \t%r4, %r3, 8;
\tshr.u32 \t%r5, %r1, 3;
\tand.b32 \t%r6, %r5, 3;
\tshl.b32 \t%r7, %r6, 4;
\tadd.s32 \t%r8, %r4, %r7;
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r20, %r21, %r22, %r23}, [%r8];
\txor.b32 \t%r9, %r6, %r3;
\tshl.b32 \t%r10, %r9, 4;
\tadd.s32 \t%r11, %r4, %r10;
\tldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r20, %r21, %r22, %r23}, [%r11];
""")
    assert [(r["wavefronts"], r["ideal"]) for r in rows] == [(32.0, 4.0), (4.0, 4.0)]


def test_signed_bit_field_extract_and_selects():
    # bfe.s32 of one bit gives 0 or -1 (all ones), so the and keeps 64 or nothing; the
    # selp takes the lane's parity from a setp
    rows = _sites("""
\tbfe.s32 \t%r3, %r1, 0, 1;
\tand.b32 \t%r4, %r3, 64;
\tshl.b32 \t%r5, %r1, 7;
\txor.b32 \t%r6, %r5, %r4;
\tst.shared.v4.b32 \t[%r6], {%r5, %r5, %r5, %r5};
\tand.b32 \t%r7, %r1, 1;
\tsetp.eq.s32 \t%p1, %r7, 0;
\tselp.b32 \t%r8, 0, 64, %p1;
\txor.b32 \t%r9, %r5, %r8;
\tst.shared.v4.b32 \t[%r9], {%r5, %r5, %r5, %r5};
""")
    # lane t at 128 t (+64 on odd lanes): every store starts a 128-byte row, so without the
    # +64 all 32 lanes share bank group 0 (32 wavefronts); with it they split over 2 (16)
    assert [r["wavefronts"] for r in rows] == [16.0, 16.0]


def test_unknown_addresses_are_reported_not_guessed():
    rows = _sites("""
\tld.global.b32 \t%r3, [%rd1];
\tst.shared.b32 \t[%r3], %r1;
""")
    assert rows == [dict(line=rows[0]["line"], instr="st.shared.b32", warps_evaluated=0,
                         wavefronts=None, ideal=None)]


@pytest.mark.parametrize("warps", [1, 4])
def test_command_line_on_a_file(tmp_path, capsys, warps):
    ptx = tmp_path / "k.ptx"
    ptx.write_text(_HEAD + "\tshl.b32 \t%r3, %r1, 4;\n"
                   "\tst.shared.v4.b32 \t[%r3], {%r5, %r6, %r7, %r8};\n\tret;\n}\n")
    assert sbc.main([str(ptx), "--warps", str(warps)]) == 0
    out = capsys.readouterr().out
    assert f"| st.shared.v4.b32 | {warps} | 4.0 | 4.0 |" in out
