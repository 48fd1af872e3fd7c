// A CUPTI injection library that writes a process's GPU timeline to a text file: every driver
// API call (CPU start and end), every kernel and every copy (GPU start and end), all on CUPTI's
// one nanosecond clock. It needs no change to the traced program and works for any process that
// loads the CUDA driver, kvloft's server and bench included:
//
//   gcc -O2 -shared -fPIC -o cupti_trace.so cupti_trace.c \
//       -I$CUPTI/include -I/usr/local/cuda/include -L$CUPTI/lib64 -lcupti \
//       -DMEMCPY_T=CUpti_ActivityMemcpyN -DKERNEL_T=CUpti_ActivityKernelN
//   CUDA_INJECTION64_PATH=$PWD/cupti_trace.so KVLOFT_CUPTI_OUT=/tmp/trace kvloft bench gpu ...
//
// Each traced process writes $KVLOFT_CUPTI_OUT.<pid>.txt, one record per line:
//   api  <start_ns> <end_ns> <thread> <correlation> <name> <result>
//   copy <start_ns> <end_ns> <stream> <correlation> <bytes> <kind>
//   kern <start_ns> <end_ns> <stream> <correlation> <grid_x> <name>
// scripts/device/cupti_report.py turns the files into per-request timelines. MEMCPY_T and
// KERNEL_T name the newest record structs of the installed CUPTI (scripts/device/gpu-trace.sh
// finds them in cupti_activity.h); the fields read here exist in every version.
#include <cupti.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#ifndef MEMCPY_T
#error "define MEMCPY_T as the newest CUpti_ActivityMemcpy struct of this CUPTI"
#endif
#ifndef KERNEL_T
#error "define KERNEL_T as the newest CUpti_ActivityKernel struct of this CUPTI"
#endif

#define BUFFER_BYTES (16u << 20)

static FILE *out;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                                      size_t valid) {
    (void)ctx;
    (void)stream;
    (void)size;
    CUpti_Activity *r = NULL;
    pthread_mutex_lock(&out_lock);
    while (out && cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
        switch (r->kind) {
        case CUPTI_ACTIVITY_KIND_DRIVER: {
            CUpti_ActivityAPI *a = (CUpti_ActivityAPI *)r;
            const char *name = "?";
            cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
            fprintf(out, "api %llu %llu %u %u %s %u\n", (unsigned long long)a->start,
                    (unsigned long long)a->end, a->threadId, a->correlationId, name,
                    (unsigned)a->returnValue);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            MEMCPY_T *m = (MEMCPY_T *)r;
            fprintf(out, "copy %llu %llu %u %u %llu %u\n", (unsigned long long)m->start,
                    (unsigned long long)m->end, m->streamId, m->correlationId,
                    (unsigned long long)m->bytes, (unsigned)m->copyKind);
            break;
        }
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            KERNEL_T *k = (KERNEL_T *)r;
            fprintf(out, "kern %llu %llu %u %u %d %s\n", (unsigned long long)k->start,
                    (unsigned long long)k->end, k->streamId, k->correlationId, k->gridX,
                    k->name ? k->name : "?");
            break;
        }
        default:
            break;
        }
    }
    if (out)
        fflush(out);
    pthread_mutex_unlock(&out_lock);
    free(buffer);
}

static void flush_all(void) { cuptiActivityFlushAll(1); }

// The driver calls this once it has loaded the library named by CUDA_INJECTION64_PATH.
int InitializeInjection(void) {
    const char *base = getenv("KVLOFT_CUPTI_OUT");
    char path[4096];
    snprintf(path, sizeof path, "%s.%d.txt", base ? base : "cupti", (int)getpid());
    out = fopen(path, "w");
    if (!out) {
        fprintf(stderr, "cupti_trace: cannot write %s\n", path);
        return 0;
    }
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
        fprintf(stderr, "cupti_trace: could not enable activity tracing\n");
        return 0;
    }
    // Records reach the file within a second even when the process is killed later.
    cuptiActivityFlushPeriod(1000);
    atexit(flush_all);
    fprintf(stderr, "cupti_trace: writing %s\n", path);
    return 1;
}
