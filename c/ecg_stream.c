/* Streaming inference of an exported ticket: push hops of samples, get each output step
 * as soon as its look-ahead has arrived (export_c.py --stream; the same as stream.py).
 *
 * Every tensor is a ring holding the last `cap` columns that later outputs still need
 * (capacities from export_c.py's simulation of the schedule), so RAM does not grow with
 * the recording. Each layer computes its next output column as soon as the columns it
 * reads exist; at the end, ecg_stream_flush() treats the columns past the (zero-padded)
 * end as zero, as the whole-record pass does. Same layer table and arithmetic as
 * ecg_infer.c, column by column.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "ecg_stream.h"
#include "ecg_ticket.h"

#ifdef ECG_INT8
static act_t store(float v) {
    v = roundf(v);
    return (act_t)(v > ECG_ACT_MAX ? ECG_ACT_MAX : (v < -ECG_ACT_MAX ? -ECG_ACT_MAX : v));
}
#else
static act_t store(float v) { return v; }
#endif

static union { float align; uint8_t bytes[ECG_ARENA_BYTES]; } arena;
#define TENSOR(offset) ((act_t *)(arena.bytes + (offset)))

static int32_t produced[ECG_LAYERS]; /* columns each layer has written */
static int32_t total = -1;           /* padded samples once flushed, else -1 */

/* Columns of a tensor of `div` samples per column in the end (INT32_MAX while streaming). */
static int32_t length(int32_t div) { return total < 0 ? INT32_MAX : total / div; }

static int ready(int k) {
    const ecg_layer *L = &ECG_NET[k];
    const ecg_ring *R = &ECG_RING[k];
    int32_t i = produced[k];
    if (i >= length(R->out_div)) return 0;
    int32_t have = produced[R->src_layer], end = length(R->in_div);
    int32_t last = L->kind == ECG_CONV ? i * L->stride - L->pad + (1 << L->kbits) - 1 : i;
    if ((last < end ? last : end - 1) >= have) return 0;
    if (L->kind == ECG_CONV && L->res_channels &&
        (i + 1) * L->res_stride - 1 >= produced[R->res_layer]) return 0;
    return 1;
}

static void column(int k, float *logits) {
    const ecg_layer *L = &ECG_NET[k];
    const ecg_ring *R = &ECG_RING[k];
    const act_t *x = TENSOR(L->src);
    act_t *y = TENSOR(L->dst);
    int32_t i = produced[k], end = length(R->in_div);
    if (L->kind == ECG_AFFINE) {
        for (int c = 0; c < L->out_channels; c++) {
            float v = L->scale[c] * (float)x[c * R->src_cap + i % R->src_cap] + L->bias[c];
            y[c * R->dst_cap + i % R->dst_cap] = store(v > 0.0f ? v : 0.0f);
        }
        return;
    }
    const int mask = (1 << L->kbits) - 1;
    for (int o = 0; o < L->out_channels; o++) {
        acc_t acc = 0;
        for (uint32_t j = L->row[o]; j < L->row[o + 1]; j++) {
            int32_t t = i * L->stride - L->pad + (L->col[j] & mask);
            if (t >= 0 && t < end)
                acc += (acc_t)L->w[j] * x[(L->col[j] >> L->kbits) * R->src_cap + t % R->src_cap];
        }
#ifdef ECG_INT8
        float v = (float)acc * L->mult[o] + L->bias[o];
#else
        float v = acc + L->bias[o];
#endif
        if (L->res_channels && o < L->res_channels) {
            const act_t *r = TENSOR(L->res) + o * R->res_cap;
            act_t m = r[(i * L->res_stride) % R->res_cap];
            for (int s = 1; s < L->res_stride; s++) {
                act_t v2 = r[(i * L->res_stride + s) % R->res_cap];
                if (v2 > m) m = v2;
            }
            v += (float)m * L->res_mult;
        }
        if (L->relu && v < 0.0f) v = 0.0f;
        if (logits) logits[o] = v;
        else y[o * R->dst_cap + i % R->dst_cap] = store(v);
    }
}

/* Runs every layer as far as its inputs allow; returns the logit steps written. At the
 * flush the layers take turns, each at most one push's worth of columns per turn, so the
 * rings need not hold a layer's whole remainder at once. */
static int run(float *logits) {
    int steps = 0, progress = 1;
    while (progress) {
        progress = 0;
        for (int k = 1; k < ECG_LAYERS; k++) {
            int32_t quota = ECG_HOP / ECG_RING[k].out_div, made = 0;
            if (quota < 1) quota = 1;
            while ((total < 0 || made < quota) && ready(k)) {
                column(k, k == ECG_LAYERS - 1 ? logits + steps * ECG_CLASSES : NULL);
                if (k == ECG_LAYERS - 1) steps++;
                produced[k]++;
                made++;
            }
            if (total >= 0 && made) progress = 1;
        }
    }
    return steps;
}

int ecg_stream_hop(void) { return ECG_HOP; }
int ecg_stream_max_steps(void) { return ECG_STREAM_MAX_STEPS; }
int ecg_stream_classes(void) { return ECG_CLASSES; }

void ecg_stream_reset(void) {
    for (int k = 0; k < ECG_LAYERS; k++) produced[k] = 0;
    total = -1;
}

int ecg_stream_push(const float *samples_uv, int n, float *logits) {
    if (n < 0 || n > ECG_HOP || total >= 0) return -1;
    const ecg_layer *L = &ECG_NET[0];
    act_t *y = TENSOR(L->dst);
    for (int i = 0; i < n; i++, produced[0]++)
        y[produced[0] % ECG_RING[0].dst_cap] = store((samples_uv[i] - ECG_MEAN) * L->input_mult);
    return run(logits);
}

int ecg_stream_flush(float *logits) {
    if (total >= 0) return 0;
    act_t *y = TENSOR(ECG_NET[0].dst);
    while (produced[0] % ECG_STRIDE) /* zero after z-scoring, as in training */
        y[produced[0]++ % ECG_RING[0].dst_cap] = 0;
    total = produced[0];
    return run(logits);
}
