/* Types of the layer table that export_c.py writes into ecg_ticket.h. */
#ifndef ECG_LAYER_H
#define ECG_LAYER_H
#include <stdint.h>

#if defined(ECG_INT8) && ECG_ACT_BITS == 8
typedef int8_t act_t;    /* activations */
typedef int8_t weight_t;
typedef int32_t acc_t;   /* sums of products */
#define ECG_ACT_MAX 127
#elif defined(ECG_INT8)  /* 16-bit activations, 8-bit weights (TFLite's "16x8" scheme) */
typedef int16_t act_t;
typedef int8_t weight_t;
typedef int64_t acc_t;   /* 8192 products of 2^15 x 2^7 can exceed 2^31 */
#define ECG_ACT_MAX 32767
#else
typedef float act_t;
typedef float weight_t;
typedef float acc_t;
#endif

enum { ECG_INPUT, ECG_AFFINE, ECG_CONV };

typedef struct {
    uint8_t kind;           /* ECG_INPUT, ECG_AFFINE or ECG_CONV */
    uint8_t relu;           /* ECG_CONV: apply ReLU to the output */
    uint8_t kbits;          /* ECG_CONV: log2(kernel size); col = channel << kbits | tap */
    uint8_t stride;         /* ECG_CONV: 1 or 2 */
    uint8_t res_stride;     /* ECG_CONV: shortcut max-pool (1 = none) */
    uint16_t pad;           /* ECG_CONV: zero samples on the left (Keras 'same') */
    uint16_t out_channels;
    uint16_t res_channels;  /* ECG_CONV: channels of the shortcut (0 = no shortcut) */
    uint32_t src, dst, res; /* byte offsets of the input, output and shortcut in the arena */
    int32_t in_len, out_len;
    const uint32_t *row;    /* ECG_CONV: CSR row starts, out_channels + 1 */
    const uint16_t *col;
    const weight_t *w;
    const float *bias;      /* per output channel (BatchNorm folded in) */
    const float *mult;      /* ECG_CONV, int8: weight scale x input scale / output scale */
    const float *scale;     /* ECG_AFFINE: per channel */
    float res_mult;         /* ECG_CONV: shortcut scale / output scale (1 in fp32) */
    float input_mult;       /* ECG_INPUT: 1 / (std x input scale) */
} ecg_layer;

/* Streaming (ecg_stream.c): every tensor is a ring of its last `cap` columns. */
typedef struct {
    int16_t src_layer, res_layer; /* layers that write the input and the shortcut (-1: none) */
    int32_t src_cap, res_cap, dst_cap; /* ring capacities in columns */
    int32_t in_div, out_div;      /* input samples per column of the input and of the output */
} ecg_ring;

#endif
