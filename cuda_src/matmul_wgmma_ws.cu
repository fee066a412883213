// PROMOTE_INSTR > 0: promotion every PROMOTE_INSTR k32 instructions, the
// device function's PROMOTE < 0. It comes as its own non-negative constant
// because MLX names the kernel after its template values and NVRTC cannot
// look up a name holding "-1" (cuda_matmul.promote_template).
mlx_flash::matmul_wgmma_ws<TA, TB, TO, FA, FB, TRANS_B, AS, BS, BN, STAGES, (PROMOTE_INSTR ? -PROMOTE_INSTR : PROMOTE), NATIVE, ACC2, RAW>(a, b, a_scale, b_scale, ip, tmpl, out, tmaps);
