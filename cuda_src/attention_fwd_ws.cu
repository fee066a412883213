static_assert(mlx_flash::WsIsBf16<decltype(q)>::value == BF16, "BF16 must name q's type");
mlx_flash::attention_fwd_ws<mlx_flash::Features<false, false, 0, WINDOW, false, false, false, false>, D, DV, BN, STAGES, EXP2POLY, WARPGROUPS, CHAINS, RESCALE, TURNS>(
    q, k, v, ip, fp, tmpl, tk, out, lse, tmaps);
