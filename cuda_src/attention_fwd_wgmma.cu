static_assert(D == DV, "attention_fwd_wgmma needs Dqk == Dv");
mlx_flash::attention_fwd_wgmma<T, MT, mlx_flash::Features<SOFTCAP, ALIBI, MASK_KIND, WINDOW, BLOCK_MASK, SINKS, VARLEN, KEY_RANGE>, D, BN, STAGES>(
    q, k, v, mask, alibi, sinks, bmask, cu_q, cu_k, ip, fp, out, lse, kstart, klen);
