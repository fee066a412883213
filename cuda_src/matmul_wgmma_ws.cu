mlx_flash::matmul_wgmma_ws<TA, TB, TO, FA, FB, TRANS_B, AS, BS, BN, STAGES, PROMOTE, NATIVE, ACC2>(a, b, a_scale, b_scale, ip, tmpl, out, tmaps);
