/*
 * vk_internal.h: what the two files of the Vulkan backend share: the context (vkctx),
 * buffers (vbuf), binding numbers and push constants (shaders/common.glsl).
 * vk_device.c: instance and device, buffers, memory for KlaState and KlaBuffer.
 * vk_backend.c: pipelines, the context's setup, one call's recording, the entry points.
 */
#ifndef KLA_VK_INTERNAL_H
#define KLA_VK_INTERNAL_H

#include <vulkan/vulkan.h>

#include "kla_internal.h"

enum { SH_PREP, SH_POST, SH_REC_FWD, SH_REC_BWD, SH_REC_DSTATE, SH_CHUNK_PREP, SH_CHUNK_STATE, SH_CHUNK_OUT,
       SH_CHUNK_DSTATE, SH_CHUNK_BWDV, SH_CHUNK_BWD, NSHADERS };

/* binding numbers: shaders/common.glsl */
enum {
    B_Q, B_K, B_V, B_G, B_A, B_H0, B_OFFS, B_O, B_HT, B_QH, B_KH, B_NRM, B_BETA, B_CKPT,
    B_DO, B_DHT, B_SCR, B_DQP, B_DKP, B_DSP, B_DV, B_DQ, B_DK, B_DG, B_DA, B_DH0,
    B_W, B_U, B_VN, B_HS, B_GC, B_DCK, NBIND
};

/* push constants: shaders/common.glsl */
typedef struct pconst {
    int32_t N, H, HV, total;
    int32_t grp, nvb, mode, flags;
    float scale, eps;
    int32_t nchunk, pad;
    int32_t w0, w1; /* window of a sequential pass (common.glsl) */
} pconst;

enum {
    F_G = 1, F_H0 = 2, F_HT = 4, F_L2Q = 8, F_L2K = 16, F_DHT = 32, F_DH0 = 64, F_DG = 128,
    F_CKPT = 256, F_TM = 512, F_DVI = 1024
};

#define NSTAMPS 12 /* start, widen, one after each of up to 8 dispatches, narrow, end */
#define NCONV 16   /* 16-bit tensors of one call (convert.comp) */

typedef struct vbuf {
    VkBuffer buf;
    VkDeviceMemory mem;
    VkDeviceSize cap;
    void *map;
    VkDeviceSize off; /* where the tensor starts (an application's buffer) */
    int wrapped;      /* the application's VkBuffer: not ours to free */
} vbuf;

#define NPIPES 32

typedef struct vkpipe {
    int shader;
    uint32_t spec[5];
    VkPipeline pipe;
    uint32_t epoch; /* the call that last used it */
} vkpipe;

typedef struct vkctx {
    VkInstance inst;
    VkDebugUtilsMessengerEXT messenger;
    VkPhysicalDevice pd;
    VkDevice dev;
    VkQueue queue;
    uint32_t qfam;
    VkCommandPool pool;
    VkCommandBuffer cb;
    VkFence fence;
    int external;      /* the application's instance, device and queue: not ours to destroy */
    VkQueryPool timer; /* timestamps around each dispatch, when the queue has them */
    double tick_ns;
    /* GPU time of the last call that succeeded (kla_gpu_time): all dispatches, then each */
    double gpu_ms, split_ms[NSTAMPS];
    const char *split_name[NSTAMPS];
    int nsplit;
    const char *pipe_name; /* shader of the pipeline get_pipe returned last */
    VkDescriptorSetLayout dsl;
    VkPipelineLayout pl;
    VkDescriptorPool dpool;
    VkDescriptorSet set;
    /* convert.comp: 16-bit tensors widened and narrowed, one set per conversion of a call */
    VkDescriptorSetLayout conv_dsl;
    VkPipelineLayout conv_pl;
    VkPipeline conv_pipe;
    VkShaderModule conv_mod;
    VkDescriptorSet conv_set[NCONV];
    VkShaderModule mod[NSHADERS];
    vkpipe pipes[NPIPES];
    int npipes;
    uint32_t epoch; /* calls recorded so far */
    VkPhysicalDeviceProperties props;
    VkPhysicalDeviceMemoryProperties mem;
    int direct;   /* buffers mapped directly, no staging */
    int subgroup; /* subgroup arithmetic in compute shaders */
    int64_t loop_cap; /* loop iterations one invocation may run; 0 = no cap (see window) */
    int stats;    /* KLA_VULKAN_PIPELINE_STATS: print each new pipeline's driver statistics */
    int passes;   /* KLA_VULKAN_PASSES: forward/backward dispatches recorded n times, last timed */
    uint32_t dev_type_local, host_type;
    vbuf b[NBIND];
    vbuf b16[NBIND]; /* host tensors in 16 bits, as uploaded (or to be downloaded) */
    int32_t *offs_cache; /* what B_OFFS holds (bind_prep), noffs_cache entries, in offs_buf */
    int64_t noffs_cache;
    VkBuffer offs_buf;
    vbuf staging;
    /* per call: bytes used by each binding, staging transfers */
    VkDeviceSize used[NBIND];
    int alias[NBIND]; /* binding -> buffer slot (decode binds the state twice) */
} vkctx;

/* vk_device.c */
int kla__vulkan_messages(void);
int env_on(const char *name);
int has_ext(const VkExtensionProperties *e, uint32_t n, const char *name);
VkResult make_instance(VkInstance *inst, VkDebugUtilsMessengerEXT *messenger, int validate);
void destroy_instance(VkInstance inst, VkDebugUtilsMessengerEXT messenger);
int list_devices(VkInstance inst, VkPhysicalDevice **out);
int compute_family(VkPhysicalDevice pd, uint32_t *fam);
const char *type_name(VkPhysicalDeviceType t);
int choose_device(VkPhysicalDevice *pd, int n, int want, char *err, size_t errlen);
int vk_usable(void);
void buf_free(vkctx *c, vbuf *b);
int buf_ensure(vkctx *c, vbuf *b, VkDeviceSize bytes, int host);
int submit_wait(vkctx *c);
int begin_cb(vkctx *c);
int vk_mem_new(void *state, int64_t bytes, void **h);
void vk_mem_free(void *state, void *h);
int vk_mem_copy(void *state, void *h, void *host, int64_t bytes, int to_dev);
int vk_mem_wrap(void *state, uint64_t buffer, uint64_t offset, int64_t bytes, void **h);
void vk_mem_handle(void *h, uint64_t *buffer, uint64_t *offset);

static inline void barrier(VkCommandBuffer cb, VkPipelineStageFlags src, VkAccessFlags sa,
                           VkPipelineStageFlags dst, VkAccessFlags da)
{
    VkMemoryBarrier mb = { .sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = sa, .dstAccessMask = da };
    vkCmdPipelineBarrier(cb, src, dst, 0, 1, &mb, 0, NULL, 0, NULL);
}

#endif
