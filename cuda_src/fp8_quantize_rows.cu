mlx_flash::fp8_quantize_rows<T, MB, BIAS, MAXCODE, HASINF>(x, ip, codes, scale);
