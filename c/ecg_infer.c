/* Inference of an exported lottery ticket: the kernels and the loop over the layers.
 *
 * The network (weights, layer table, buffer plan) is in ecg_ticket.h, written by
 * export_c.py. Activations are channel-major ([channel][time]) in one static arena.
 * Three kinds of layer cover the whole residual network once BatchNorm is folded:
 *   ECG_INPUT   z-score the samples (and zero-pad to the window)
 *   ECG_AFFINE  y = relu(a[c] * x + b[c]): a BatchNorm-ReLU that cannot be folded into a
 *               conv (it follows a residual sum)
 *   ECG_CONV    sparse 1-D conv with Keras 'same' padding, a bias (BatchNorm folded in), an
 *               optional ReLU and an optional shortcut added (max-pooled by 2 where the
 *               block subsamples, zero for the channels the block adds); the final linear
 *               layer is a conv of length 1 writing float logits.
 * Weights are stored per output channel as CSR: for output channel o, entries
 * row[o]..row[o+1]-1 of w[] and of col[] (col = input channel << kbits | tap).
 * With ECG_INT8 weights are int8 (per-output-channel scales) and activations int16
 * (ECG_ACT_BITS 16) or int8 (ECG_ACT_BITS 8) with per-tensor scales; products are summed
 * in integers and each output is rescaled in float: mult[o] = weight scale * input scale
 * / output scale.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "ecg_infer.h"
#include "ecg_ticket.h"

#ifdef ECG_INT8
static act_t store(float v) {
    v = roundf(v);
    return (act_t)(v > ECG_ACT_MAX ? ECG_ACT_MAX : (v < -ECG_ACT_MAX ? -ECG_ACT_MAX : v));
}
#else
static act_t store(float v) { return v; }
#endif

/* One arena for every activation; ecg_ticket.h gives each tensor its byte offset. */
static union { float align; uint8_t bytes[ECG_ARENA_BYTES]; } arena;
#define TENSOR(offset) ((act_t *)(arena.bytes + (offset)))

static void conv(const ecg_layer *L, float *logits) {
    const act_t *x = TENSOR(L->src);
    const act_t *res = L->res_channels ? TENSOR(L->res) : NULL;
    act_t *y = TENSOR(L->dst);
    const int mask = (1 << L->kbits) - 1;
    for (int o = 0; o < L->out_channels; o++) {
        for (int t = 0; t < L->out_len; t++) {
            acc_t acc = 0;
            for (uint32_t j = L->row[o]; j < L->row[o + 1]; j++) {
                int i = t * L->stride - L->pad + (L->col[j] & mask);
                if (i >= 0 && i < L->in_len)
                    acc += (acc_t)L->w[j] * x[(L->col[j] >> L->kbits) * L->in_len + i];
            }
#ifdef ECG_INT8
            float v = (float)acc * L->mult[o] + L->bias[o];
#else
            float v = acc + L->bias[o];
#endif
            if (res && o < L->res_channels) { /* shortcut: max-pool by res_stride */
                const act_t *r = res + (o * L->out_len + t) * L->res_stride;
                act_t m = r[0];
                for (int s = 1; s < L->res_stride; s++)
                    if (r[s] > m) m = r[s];
                v += (float)m * L->res_mult;
            }
            if (L->relu && v < 0.0f) v = 0.0f;
            if (logits) logits[t * L->out_channels + o] = v;
            else y[o * L->out_len + t] = store(v);
        }
    }
}

static void affine_relu(const ecg_layer *L) {
    const act_t *x = TENSOR(L->src);
    act_t *y = TENSOR(L->dst);
    for (int c = 0; c < L->out_channels; c++)
        for (int t = 0; t < L->out_len; t++) {
            float v = L->scale[c] * (float)x[c * L->in_len + t] + L->bias[c];
            y[c * L->out_len + t] = store(v > 0.0f ? v : 0.0f);
        }
}

int ecg_window_samples(void) { return ECG_SAMPLES; }
int ecg_steps(void) { return ECG_STEPS; }
int ecg_classes(void) { return ECG_CLASSES; }

int ecg_infer(const float *samples_uv, int n, float *logits) {
    if (n < 1 || n > ECG_SAMPLES) return -1;
    for (int k = 0; k < ECG_LAYERS; k++) {
        const ecg_layer *L = &ECG_NET[k];
        if (L->kind == ECG_INPUT) {
            act_t *y = TENSOR(L->dst);
            for (int i = 0; i < ECG_SAMPLES; i++) /* zero after z-scoring, as in training */
                y[i] = i < n ? store((samples_uv[i] - ECG_MEAN) * L->input_mult) : 0;
        } else if (L->kind == ECG_AFFINE) {
            affine_relu(L);
        } else {
            conv(L, k == ECG_LAYERS - 1 ? logits : NULL);
        }
    }
    int steps = n / ECG_STRIDE;
    return steps > 0 ? steps : 1;
}

int ecg_classify(const float *samples_uv, int n, float *mean_logits) {
    static float logits[ECG_STEPS * ECG_CLASSES];
    float mean[ECG_CLASSES] = {0};
    int steps = ecg_infer(samples_uv, n, logits);
    if (steps < 0) return -1;
    int best = 0;
    for (int c = 0; c < ECG_CLASSES; c++) {
        for (int t = 0; t < steps; t++) mean[c] += logits[t * ECG_CLASSES + c] / steps;
        if (mean[c] > mean[best]) best = c;
        if (mean_logits) mean_logits[c] = mean[c];
    }
    return best;
}
