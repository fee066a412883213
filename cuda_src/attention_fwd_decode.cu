mlx_flash::attention_fwd_decode<T, MT, mlx_flash::Features<SOFTCAP, ALIBI, MASK_KIND, WINDOW, BLOCK_MASK, SINKS, VARLEN, KEY_RANGE>, D, DV, NW, BN, STAGES, SPLIT, DVC, BULK, KR>(
    q, k, v, mask, alibi, sinks, bmask, cu_q, cu_k, ip, fp, out, lse, ws, kstart, klen, tk);
