mlx_flash::matmul_wgmma_wa_sk<TA, TO, FB, AS, BS, BT, STAGES>(a, b, a_scale, b_scale, ip, tmpl, tickets, out, tmaps, part);
