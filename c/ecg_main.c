/* Host driver for the exported C network (tests and timing; not for the device).
 *
 *   ecg_main RECORDS.f32 > LOGITS.f32   each record: int32 n, then n float32 samples (uV);
 *                                       writes each record's ecg_steps() x ecg_classes()
 *                                       float32 logits
 *   ecg_main --bench RECORDS.f32 SECONDS median ms of ecg_infer on the first record
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ecg_infer.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int bench = argc == 4 && strcmp(argv[1], "--bench") == 0;
    if (argc != 2 && !bench) {
        fprintf(stderr, "usage: %s RECORDS.f32 | --bench RECORDS.f32 SECONDS\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[bench ? 2 : 1], "rb");
    if (!f) { perror(argv[bench ? 2 : 1]); return 2; }
    int window = ecg_window_samples(), out = ecg_steps() * ecg_classes();
    float *x = malloc(sizeof(float) * window), *logits = malloc(sizeof(float) * out);
    int32_t n;
    int status = 0;
    while (fread(&n, sizeof n, 1, f) == 1) {
        if (n < 1 || n > window || fread(x, sizeof(float), n, f) != (size_t)n) {
            fprintf(stderr, "bad record (n = %d, window %d)\n", n, window);
            status = 1;
            break;
        }
        if (bench) {
            double times[10000], end = now() + atof(argv[3]);
            int runs = 0;
            while ((now() < end || runs < 3) && runs < 10000) {
                double t0 = now();
                ecg_infer(x, n, logits);
                times[runs++] = now() - t0;
            }
            qsort(times, runs, sizeof times[0], cmp);
            printf("%.4f ms median of %d runs\n", 1e3 * times[runs / 2], runs);
            break;
        }
        ecg_infer(x, n, logits);
        fwrite(logits, sizeof(float), out, stdout);
    }
    free(x);
    free(logits);
    fclose(f);
    return status;
}
