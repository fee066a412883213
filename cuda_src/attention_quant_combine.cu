mlx_flash::attention_quant_combine<T, DV, SINKS>(part_o, part_lse, sinks, ip, ns, out, lse);
