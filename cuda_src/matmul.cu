mlx_flash::matmul_mma<TA, TB, C, TO, FA, FB, TRANS_B, AS, BS, NATIVE_FP8>(a, b, a_scale, b_scale, ip, out);
