/* Host driver for the streaming C network (tests; not for the device).
 *
 *   ecg_stream_main RECORDS.f32 > LOGITS.f32   each record: int32 n, then n float32 samples;
 *       pushed in hops of ecg_stream_hop() samples, then flushed; writes int32 steps, then
 *       steps x classes float32 logits, and reports on stderr the push after which each
 *       step came out (as "step:push" pairs) for the first record
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "ecg_stream.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s RECORDS.f32\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 2; }
    int hop = ecg_stream_hop(), most = ecg_stream_max_steps(), status = 0, first = 1;
    const int CLASSES = ecg_stream_classes();
    float *x = malloc(sizeof(float) * hop), *step = malloc(sizeof(float) * most * CLASSES);
    float *all = NULL;
    int32_t n;
    while (fread(&n, sizeof n, 1, f) == 1) {
        int32_t steps = 0, pushes = 0;
        all = realloc(all, sizeof(float) * (n / hop + 2) * CLASSES);
        ecg_stream_reset();
        for (int32_t done = 0; done < n; done += hop, pushes++) {
            int m = n - done < hop ? n - done : hop;
            if (fread(x, sizeof(float), m, f) != (size_t)m) { status = 1; break; }
            int got = ecg_stream_push(x, m, step);
            if (got < 0) { status = 1; break; }
            for (int s = 0; s < got * CLASSES; s++) all[steps * CLASSES + s] = step[s];
            for (int s = 0; s < got && first; s++) fprintf(stderr, "%d:%d ", steps + s, pushes);
            steps += got;
        }
        if (status) break;
        int got = ecg_stream_flush(step);
        for (int s = 0; s < got * CLASSES; s++) all[steps * CLASSES + s] = step[s];
        steps += got;
        first = 0;
        fwrite(&steps, sizeof steps, 1, stdout);
        fwrite(all, sizeof(float), steps * CLASSES, stdout);
    }
    free(x);
    free(step);
    free(all);
    fclose(f);
    return status;
}
