/* Streaming inference of an exported ticket (export_c.py --stream), C99, no allocation. */
#ifndef ECG_STREAM_H
#define ECG_STREAM_H

/* Samples per push at most, and logit steps one push or flush can return at most. */
int ecg_stream_hop(void);
int ecg_stream_max_steps(void);
int ecg_stream_classes(void);
/* Start a new recording. */
void ecg_stream_reset(void);
/* Push n <= ECG_HOP new samples (microvolts, 200 Hz); writes the steps that became
 * computable to logits (time-major, ecg_stream_max_steps() x classes floats) and returns
 * their number, or -1 if n is out of range or the recording was flushed. */
int ecg_stream_push(const float *samples_uv, int n, float *logits);
/* End the recording (zero-padded to the stride, as in training): the remaining steps. */
int ecg_stream_flush(float *logits);

#endif
