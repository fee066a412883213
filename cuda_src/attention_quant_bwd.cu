mlx_flash::attention_quant_bwd<T, KST, VST, MT, mlx_flash::Features<SOFTCAP, ALIBI, MASK_KIND, WINDOW, false, false, false>, D, DV, BITS, GS, W, RW>(
    q, kw, ks, kb, vw, vs, vb, mask, alibi, ip, fp, lse, delta, dout, dq);
