"""Bytes each backward option moves, computed from the shapes (no GPU): the table in README.md.

    python -m hilt_kernels.traffic [--batch 2 --queries 64 --keys 32768 --width 768 --separate]

Two numbers per option: DRAM bytes (every tensor a pass touches, read or written once per pass;
the split partials counted out and back) and the L2 -> SM bytes of tiles a program re-reads in
its key loop (Q and dO per key block in the dK/dV pass; once per program in the hybrid pass: they
stay in L2 but cost load bandwidth and instructions). FLOPs are the same 10 x M x N x C per batch for all options (S, dP, dQ, and
dK, dV as two products over M rows). Floors divide by a copy rate (H200: 4.3 TB/s read + write,
docs/BENCHMARKS.md): estimates to compare options, not measurements.
"""

import argparse
import math

from hilt_kernels.launch import fa2_num_splits

H200_COPY_BPS = 4.3e12  # device-to-device copy, bytes read + written per second (KINDS.md, 2026-10-28)
H200_SMS = 132


def _splits(programs: int, n: int, block_n: int, sms: int) -> int:
    return fa2_num_splits(programs, sms, math.ceil(n / block_n))


def backward_traffic(
    batch: int, m: int, n: int, c: int, elem: int = 2, same_kv: bool = True, sms: int = H200_SMS
) -> dict[str, dict]:
    """{option: {dram, l2_rereads, launches, note}} for the wide-head backward options."""
    kv = 1 if same_kv else 2
    k_bytes = batch * n * c * elem  # one of K, V (or dK, dV)
    q_bytes = batch * m * c * elem  # one of Q, dO, dQ
    pds = 2 * batch * m * n * elem  # P and scale dS, input dtype

    # Two-pass (the previous default): dK/dV pass with 16-key blocks, 64 queries per program ...
    kv_blocks = batch * math.ceil(n / 16)
    dkdv = {"dram": kv * k_bytes + 2 * q_bytes + kv * k_bytes, "l2": kv_blocks * 2 * m * c * elem}
    # ... then a dQ pass (32-query blocks, 64 keys) over K (and V) again, fp32 partials.
    n_m = math.ceil(m / 32)
    s_dq = _splits(batch * n_m, n, 64, sms)
    dq_pass = kv * k_bytes + 2 * q_bytes + 2 * s_dq * batch * m * c * 4 + q_bytes
    two_pass = {
        "dram": dkdv["dram"] + dq_pass,
        "l2_rereads": dkdv["l2"],
        "launches": 2,
        "note": f"K read twice; Q, dO re-read per 16 keys; {s_dq} dQ splits",
    }

    # Hybrid (the new default): one pass writes P, scale dS and the dQ partials; one GEMM.
    block_n = 32 if same_kv else 16
    s_h = _splits(batch * n_m, n, block_n, sms)
    one_pass = kv * k_bytes + 2 * q_bytes + pds + 2 * s_h * batch * m * c * 4 + q_bytes
    gemm = pds + 2 * q_bytes + kv * k_bytes
    hybrid = {
        "dram": one_pass + gemm,
        "l2_rereads": batch * n_m * s_h * 2 * 32 * c * elem,  # Q, dO chunks once per program
        "launches": 2,
        "note": f"K read once; P, dS {pds / 1e6:.1f} MB out and back; {s_h} dQ splits",
    }

    # Fused single pass (narrow heads' design): K once, dQ on chip; at C = 768 it spills 1.4-4.6 KB
    # per thread or exceeds shared memory (compile evidence), so it is listed, not launched.
    s_f = _splits(batch, n, 16, sms)
    fused = {
        "dram": kv * k_bytes + 2 * q_bytes + kv * k_bytes + 2 * s_f * batch * m * c * 4 + q_bytes,
        "l2_rereads": dkdv["l2"],
        "launches": 1,
        "note": "does not compile without spills at C = 768",
    }
    return {"two-pass (dK/dV + dQ)": two_pass, "hybrid (P, dS + GEMM)": hybrid, "fused one pass": fused}


def format_table(rows: dict[str, dict], copy_bps: float = H200_COPY_BPS) -> str:
    lines = [
        "| backward option | DRAM MB | floor us (copy rate) | L2->SM re-reads MB | launches | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['dram'] / 1e6:.1f} | {r['dram'] / copy_bps * 1e6:.0f} | "
            f"{r['l2_rereads'] / 1e6:.1f} | {r['launches']} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--keys", type=int, default=32768)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--separate", action="store_true", help="separate K and V (default: K is V)")
    a = p.parse_args(argv)
    rows = backward_traffic(a.batch, a.queries, a.keys, a.width, same_kv=not a.separate)
    text = f"B={a.batch} M={a.queries} N={a.keys} C={a.width} bf16 {'K, V' if a.separate else 'K is V'}\n"
    text += format_table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
