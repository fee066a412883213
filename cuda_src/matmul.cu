mlx_flash::matmul_mma<TA, TB, C, TO, FA, FB, TRANS_B, AS, BS>(a, b, a_scale, b_scale, ip, out);
