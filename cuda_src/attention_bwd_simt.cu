mlx_flash::attention_bwd_simt<T, MT, mlx_flash::Features<SOFTCAP, ALIBI, MASK_KIND, WINDOW, BLOCK_MASK, false, VARLEN, KEY_RANGE>, D, DV, W, HAS_DLSE, NCH>(
    q, k, v, mask, alibi, bmask, cu_q, cu_k, ip, fp, dout, lse, o, dlse, dq_acc, dk, dv, kstart, klen);
