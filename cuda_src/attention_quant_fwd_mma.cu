mlx_flash::attention_quant_fwd_mma<T, KST, VST, MT, mlx_flash::Features<SOFTCAP, ALIBI, MASK_KIND, WINDOW, false, SINKS, false>, D, DV, BITS, GS, NW, BN>(
    q, kw, ks, kb, vw, vs, vb, mask, alibi, sinks, ip, fp, out, lse);
