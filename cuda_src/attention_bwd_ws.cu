static_assert(mlx_flash::BwdWsElem<decltype(q)>::bf16 == BF16, "BF16 must name q's type");
mlx_flash::attention_bwd_ws<typename mlx_flash::BwdWsElem<decltype(q)>::type,
                            mlx_flash::Features<false, false, 0, WINDOW, false, false, false, false>, D, STAGES,
                            HEADS_FIRST, DQW>(q, k, v, ip, fp, dout, lse, delta, dq_acc, dk, dv);
