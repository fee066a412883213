mlx_flash::matmul_wgmma_wa<TA, TO, FB, AS, BS, BT, STAGES>(a, b, a_scale, b_scale, ip, tmpl, out, tmaps);
