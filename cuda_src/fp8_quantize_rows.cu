mlx_flash::fp8_quantize_rows<T, VEC, MB, BIAS, MAXCODE, HASINF>(x, ip, codes, scale);
