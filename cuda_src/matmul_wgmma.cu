mlx_flash::matmul_wgmma<TA, TB, C, TO, FA, FB, TRANS_B, AS, BS, BN, STAGES, PROMOTE, NATIVE, TMA>(a, b, a_scale, b_scale, ip, tmpl, out, tmaps);
