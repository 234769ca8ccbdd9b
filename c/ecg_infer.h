/* Inference of an exported lottery ticket (export_c.py) on one single-lead ECG window.
 *
 * C99, no allocation: every activation lives in one static arena whose size the exporter
 * planned (ECG_ARENA_BYTES in ecg_ticket.h). Samples are microvolts at 200 Hz, as the
 * network was trained on. Not reentrant (one arena).
 */
#ifndef ECG_INFER_H
#define ECG_INFER_H

/* Samples in one window (the longest input; shorter ones are zero-padded as in training). */
int ecg_window_samples(void);
/* Output steps per window (one per 256 samples for the published depth) and classes. */
int ecg_steps(void);
int ecg_classes(void);

/* Per-step logits, time-major: logits[t * ecg_classes() + c] for t < ecg_steps().
 * Returns the number of steps covered by the n samples (at least 1), or -1 if n is out of
 * 1..ecg_window_samples(). */
int ecg_infer(const float *samples_uv, int n, float *logits);

/* The record's class index (argmax of the mean logits over its steps, as predict.py does);
 * mean_logits (ecg_classes() floats) may be NULL. -1 if n is out of range. */
int ecg_classify(const float *samples_uv, int n, float *mean_logits);

#endif
