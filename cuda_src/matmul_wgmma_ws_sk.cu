// The native fp8 kernel's stream-K form (matmul_wgmma_ws.cuh with SK): the
// tickets and fp32 partial-sum slots of tiles cut between blocks (stream_k.cuh).
mlx_flash::matmul_wgmma_ws<TA, TB, TO, FA, FB, true, AS, BS, BN, STAGES, (PROMOTE_INSTR ? -PROMOTE_INSTR : PROMOTE), true, false, 0, true>(a, b, a_scale, b_scale, ip, tmpl, out, tmaps, tickets, part);
