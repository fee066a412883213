mlx_flash::matmul_gemv<TA, TB, TO, FB, AS, BS, MT, W, RT, U, STAGES, SECTOR>(a, b, a_scale, b_scale, ip, out);
