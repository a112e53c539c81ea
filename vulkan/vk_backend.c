/*
 * vk_backend.c: the Vulkan compute backend ("vulkan"), float32.
 *
 * One context = one instance, one device, one compute queue, one command buffer. Every
 * call uploads its inputs, records all dispatches into one command buffer, submits, waits,
 * and downloads the outputs. Buffers are cached per context (one per binding, grown on
 * demand). Where the device has host-visible device-local memory and is not discrete
 * (llvmpipe, integrated GPUs) the buffers are mapped directly; else device-local buffers
 * are filled and read through one host-visible staging buffer.
 *
 * Shaders (../shaders, compiled at build time and embedded), and their workgroups:
 *   prep         qhat, khat, norms, beta              (token, key head)
 *   rec_fwd      the recurrence; decode               (V block, value head, sequence),
 *                                                     an invocation per column of S
 *   rec_dstate   the state gradient, token by token,  as rec_fwd
 *                saved at every segment end
 *   rec_bwd      BPTT of all segments in parallel     (V block, value head, worker)
 *   bwd_post     sums of partials, chain rules        (token, key head)
 *   chunk_prep   A = KK^T, (I + A)^-1, w, u           (chunk, value head)
 *   chunk_state  the sequential pass over chunks      (V block, value head, sequence)
 *   chunk_out    outputs from each chunk's state      (chunk, value head)
 *   chunk_dstate the state gradient, chunk by chunk   (V block, value head, sequence),
 *                from the last, saved at every chunk  as chunk_state
 *   chunk_bwdv   du2 = Tm^T dvnew, dv (backward)      (chunk, value head)
 *   chunk_bwd    dq, dk, dbeta, dg of a chunk         (chunk, value head)
 * Forward: chunkwise for KLA_ALGO_CHUNK and AUTO (when its tiles fit in shared memory),
 * else recurrent. Backward: for KLA_ALGO_CHUNK and AUTO (when the tiles fit) chunkwise,
 * chunk_prep, chunk_state, chunk_out, chunk_dstate, chunk_bwdv, chunk_bwd, bwd_post
 * (vk_backward_chunk); for KLA_ALGO_RECURRENT checkpointed forward, rec_dstate, rec_bwd,
 * bwd_post. Decode: rec_fwd on one token per sequence, the state bound as h0 and ht.
 * All share one descriptor-set layout (global binding numbers, shaders/common.glsl) and
 * one push-constant block; sizes are specialization constants.
 */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vk_internal.h"

static const uint32_t spv_prep_sg[] =
#include "prep_sg.spv.h"
    ;
static const uint32_t spv_prep_sh[] =
#include "prep_sh.spv.h"
    ;
static const uint32_t spv_post_sg[] =
#include "bwd_post_sg.spv.h"
    ;
static const uint32_t spv_post_sh[] =
#include "bwd_post_sh.spv.h"
    ;
static const uint32_t spv_rec_fwd[] =
#include "rec_fwd.spv.h"
    ;
static const uint32_t spv_rec_bwd[] =
#include "rec_bwd.spv.h"
    ;
static const uint32_t spv_rec_dstate[] =
#include "rec_dstate.spv.h"
    ;
static const uint32_t spv_chunk_prep[] =
#include "chunk_prep.spv.h"
    ;
static const uint32_t spv_chunk_state[] =
#include "chunk_state.spv.h"
    ;
static const uint32_t spv_chunk_out[] =
#include "chunk_out.spv.h"
    ;
static const uint32_t spv_chunk_dstate[] =
#include "chunk_dstate.spv.h"
    ;
static const uint32_t spv_chunk_bwdv[] =
#include "chunk_bwdv.spv.h"
    ;
static const uint32_t spv_chunk_bwd[] =
#include "chunk_bwd.spv.h"
    ;
static const uint32_t spv_convert[] =
#include "convert.spv.h"
    ;


static const char *bind_name(int b)
{
    static const char *const n[NBIND] = {
        "q", "k", "v", "g", "eta|beta", "h0", "offsets", "o", "ht", "qhat", "khat", "norms", "beta",
        "checkpoints", "do", "dht", "scratch", "dq partials", "dk partials", "dS partials", "dv", "dq",
        "dk", "dg", "deta|dbeta", "dh0", "w", "u", "vnew", "chunk states", "gamma", "chunk dstates" };
    return b >= 0 && b < NBIND ? n[b] : "?";
}

static const char *const shader_name[NSHADERS] = {
    [SH_PREP] = "prep", [SH_POST] = "bwd_post", [SH_REC_FWD] = "rec_fwd", [SH_REC_BWD] = "rec_bwd",
    [SH_REC_DSTATE] = "rec_dstate", [SH_CHUNK_PREP] = "chunk_prep", [SH_CHUNK_STATE] = "chunk_state",
    [SH_CHUNK_OUT] = "chunk_out", [SH_CHUNK_DSTATE] = "chunk_dstate", [SH_CHUNK_BWDV] = "chunk_bwdv",
    [SH_CHUNK_BWD] = "chunk_bwd",
};


/* ---- pipelines --------------------------------------------------------------------------- */

/* KLA_VULKAN_PIPELINE_STATS=1: the driver's statistics of a new pipeline (registers,
 * shared memory, spills: whatever the driver reports) on stderr, one line per pipeline */
static void print_stats(vkctx *c, VkPipeline p, int shader, const uint32_t spec[5])
{
    PFN_vkGetPipelineExecutablePropertiesKHR props =
        (PFN_vkGetPipelineExecutablePropertiesKHR)vkGetDeviceProcAddr(c->dev, "vkGetPipelineExecutablePropertiesKHR");
    PFN_vkGetPipelineExecutableStatisticsKHR stats =
        (PFN_vkGetPipelineExecutableStatisticsKHR)vkGetDeviceProcAddr(c->dev, "vkGetPipelineExecutableStatisticsKHR");
    if (!props || !stats) return;
    VkPipelineInfoKHR pi = { .sType = VK_STRUCTURE_TYPE_PIPELINE_INFO_KHR, .pipeline = p };
    VkPipelineExecutablePropertiesKHR ep[4];
    uint32_t ne = 4;
    for (uint32_t i = 0; i < ne; i++) ep[i] = (VkPipelineExecutablePropertiesKHR){ .sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_PROPERTIES_KHR };
    if (props(c->dev, &pi, &ne, ep) < 0) return;
    for (uint32_t e = 0; e < ne; e++) {
        VkPipelineExecutableInfoKHR ei = { .sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INFO_KHR,
                                           .pipeline = p, .executableIndex = e };
        VkPipelineExecutableStatisticKHR st[32];
        uint32_t ns = 32;
        for (uint32_t i = 0; i < ns; i++) st[i] = (VkPipelineExecutableStatisticKHR){ .sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_STATISTIC_KHR };
        if (stats(c->dev, &ei, &ns, st) < 0) continue;
        fprintf(stderr, "kla vulkan: pipeline %s (spec %u %u %u %u %u), %s, subgroup %u:", shader_name[shader],
                spec[0], spec[1], spec[2], spec[3], spec[4], ep[e].name, ep[e].subgroupSize);
        for (uint32_t i = 0; i < ns; i++) {
            fprintf(stderr, " %s=", st[i].name);
            switch (st[i].format) {
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR: fprintf(stderr, "%u", st[i].value.b32); break;
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR: fprintf(stderr, "%lld", (long long)st[i].value.i64); break;
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR: fprintf(stderr, "%llu", (unsigned long long)st[i].value.u64); break;
            default: fprintf(stderr, "%g", st[i].value.f64); break;
            }
        }
        fputc('\n', stderr);
    }
}

static VkPipeline get_pipe(vkctx *c, int shader, uint32_t s0, uint32_t s1, uint32_t s2,
                           uint32_t s3, uint32_t s4)
{
    const uint32_t spec[5] = { s0, s1, s2, s3, s4 };
    c->pipe_name = shader_name[shader]; /* the next dispatch's name, for kla_gpu_time */
    for (int i = 0; i < c->npipes; i++)
        if (c->pipes[i].shader == shader && !memcmp(c->pipes[i].spec, spec, sizeof spec)) {
            c->pipes[i].epoch = c->epoch;
            return c->pipes[i].pipe;
        }
    if (c->npipes == NPIPES) {
        /* full: drop the oldest that the command buffer being recorded does not use
         * (earlier calls have completed; a call uses fewer than NPIPES pipelines) */
        int v = 0;
        while (v < NPIPES - 1 && c->pipes[v].epoch == c->epoch) v++;
        vkDestroyPipeline(c->dev, c->pipes[v].pipe, NULL);
        memmove(c->pipes + v, c->pipes + v + 1, (size_t)(NPIPES - 1 - v) * sizeof c->pipes[0]);
        c->npipes--;
    }
    VkSpecializationMapEntry me[5];
    for (uint32_t i = 0; i < 5; i++) me[i] = (VkSpecializationMapEntry){ i, i * 4, 4 };
    VkSpecializationInfo si = { 5, me, sizeof spec, spec };
    VkComputePipelineCreateInfo ci = {
        .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
        .flags = c->stats ? VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR : 0,
        .stage = { .sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO,
                   .stage = VK_SHADER_STAGE_COMPUTE_BIT, .module = c->mod[shader],
                   .pName = "main", .pSpecializationInfo = &si },
        .layout = c->pl,
    };
    VkPipeline p = VK_NULL_HANDLE;
    if (vkCreateComputePipelines(c->dev, VK_NULL_HANDLE, 1, &ci, NULL, &p) != VK_SUCCESS)
        return VK_NULL_HANDLE;
    c->pipes[c->npipes++] = (vkpipe){ shader, { s0, s1, s2, s3, s4 }, p, c->epoch };
    if (c->stats) print_stats(c, p, shader, spec);
    return p;
}

/* ---- context --------------------------------------------------------------------------- */

static void vk_describe(void *state, char *buf, size_t len)
{
    const vkctx *c = state;
    snprintf(buf, len, "%s (%s)%s", c->props.deviceName, type_name(c->props.deviceType),
             c->direct ? "" : ", staging copies");
}

static void vk_close(void *state)
{
    vkctx *c = state;
    if (!c) return;
    if (c->dev) {
        /* every call waits for its work; an application's device is not ours to idle */
        if (!c->external) vkDeviceWaitIdle(c->dev);
        for (int i = 0; i < c->npipes; i++) vkDestroyPipeline(c->dev, c->pipes[i].pipe, NULL);
        for (int i = 0; i < NSHADERS; i++)
            if (c->mod[i]) vkDestroyShaderModule(c->dev, c->mod[i], NULL);
        for (int i = 0; i < NBIND; i++) buf_free(c, &c->b[i]), buf_free(c, &c->b16[i]);
        buf_free(c, &c->staging);
        if (c->dpool) vkDestroyDescriptorPool(c->dev, c->dpool, NULL);
        if (c->conv_pipe) vkDestroyPipeline(c->dev, c->conv_pipe, NULL);
        if (c->conv_mod) vkDestroyShaderModule(c->dev, c->conv_mod, NULL);
        if (c->conv_pl) vkDestroyPipelineLayout(c->dev, c->conv_pl, NULL);
        if (c->conv_dsl) vkDestroyDescriptorSetLayout(c->dev, c->conv_dsl, NULL);
        if (c->pl) vkDestroyPipelineLayout(c->dev, c->pl, NULL);
        if (c->dsl) vkDestroyDescriptorSetLayout(c->dev, c->dsl, NULL);
        if (c->fence) vkDestroyFence(c->dev, c->fence, NULL);
        if (c->timer) vkDestroyQueryPool(c->dev, c->timer, NULL);
        if (c->pool) vkDestroyCommandPool(c->dev, c->pool, NULL);
        if (!c->external) vkDestroyDevice(c->dev, NULL);
    }
    if (!c->external) destroy_instance(c->inst, c->messenger);
    free(c->offs_cache);
    free(c);
}

#define CHECK(call, what)                                                                        \
    do {                                                                                         \
        VkResult vr_ = (call);                                                                   \
        if (vr_ != VK_SUCCESS) {                                                                 \
            snprintf(err, errlen, "Vulkan: %s failed (%d)", what, (int)vr_);                     \
            vk_close(c);                                                                         \
            return vr_ == VK_ERROR_OUT_OF_HOST_MEMORY || vr_ == VK_ERROR_OUT_OF_DEVICE_MEMORY   \
                       ? KLA_ENOMEM                                                              \
                       : KLA_ENODEV;                                                             \
        }                                                                                        \
    } while (0)

static int vk_setup(vkctx *c, void **state, char *err, size_t errlen);

static int vk_open(void **state, const KlaParams *params, char *err, size_t errlen)
{
    *state = NULL;
    vkctx *c = calloc(1, sizeof *c);
    if (!c) return KLA_ENOMEM;
    c->gpu_ms = -1;
    CHECK(make_instance(&c->inst, &c->messenger, env_on("KLA_VULKAN_VALIDATION")), "vkCreateInstance");
    VkPhysicalDevice *pd;
    int n = list_devices(c->inst, &pd);
    int idx = n > 0 ? choose_device(pd, n, params ? params->gpu_device : -1, err, errlen) : -1;
    if (idx < 0) {
        free(pd);
        vk_close(c);
        return KLA_ENODEV;
    }
    c->pd = pd[idx];
    free(pd);
    compute_family(c->pd, &c->qfam);
    return vk_setup(c, state, err, errlen);
}

/* A context on the application's instance, device and queue (kla_open_vulkan). */
static int vk_open_external(void **state, const KlaParams *params, const KlaVulkanDevice *d, char *err,
                            size_t errlen)
{
    (void)params;
    *state = NULL;
    vkctx *c = calloc(1, sizeof *c);
    if (!c) return KLA_ENOMEM;
    c->gpu_ms = -1;
    c->external = 1;
    c->inst = (VkInstance)d->instance, c->pd = (VkPhysicalDevice)d->physical_device;
    c->dev = (VkDevice)d->device, c->queue = (VkQueue)d->queue, c->qfam = d->queue_family;
    uint32_t nf = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(c->pd, &nf, NULL);
    VkQueueFamilyProperties *qp = nf ? calloc(nf, sizeof *qp) : NULL;
    if (qp) vkGetPhysicalDeviceQueueFamilyProperties(c->pd, &nf, qp);
    const int ok = qp && c->qfam < nf && (qp[c->qfam].queueFlags & VK_QUEUE_COMPUTE_BIT);
    free(qp);
    VkPhysicalDeviceProperties pp;
    vkGetPhysicalDeviceProperties(c->pd, &pp);
    if (!ok || pp.apiVersion < VK_API_VERSION_1_1) {
        snprintf(err, errlen, ok ? "the device is Vulkan %u.%u, kla needs 1.1"
                                 : "queue family %u has no VK_QUEUE_COMPUTE_BIT (or does not exist)",
                 ok ? VK_VERSION_MAJOR(pp.apiVersion) : c->qfam, VK_VERSION_MINOR(pp.apiVersion));
        c->dev = VK_NULL_HANDLE; /* nothing of ours on it yet */
        vk_close(c);
        return KLA_EINVAL;
    }
    return vk_setup(c, state, err, errlen);
}

/* Everything after the choice of device: limits, the device and queue (unless the
 * application's), command pool, fence, timestamps, the descriptor layout, shaders. */
static int vk_setup(vkctx *c, void **state, char *err, size_t errlen)
{
    vkGetPhysicalDeviceProperties(c->pd, &c->props);
    /* A test knob: the shared-memory size the tile choices assume. Lower than the device's
     * it is always safe; higher is only for llvmpipe, which sizes shared memory per shader:
     * the suite uses it to run the 48 KiB tiling of the larger GPUs there (validation off,
     * since the layer checks the real limit). */
    const char *shl = getenv("KLA_VULKAN_SHARED_LIMIT");
    if (shl && *shl) {
        char *end;
        const unsigned long v = strtoul(shl, &end, 10);
        if (*end || v < 1024 || v > (1u << 20)) {
            snprintf(err, errlen, "KLA_VULKAN_SHARED_LIMIT=%s: expected bytes in [1024, 1048576]", shl);
            vk_close(c);
            return KLA_EINVAL;
        }
        c->props.limits.maxComputeSharedMemorySize = (uint32_t)v;
    }
    vkGetPhysicalDeviceMemoryProperties(c->pd, &c->mem);
    VkPhysicalDeviceSubgroupProperties sg = { .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES };
    VkPhysicalDeviceProperties2 p2 = { .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, .pNext = &sg };
    vkGetPhysicalDeviceProperties2(c->pd, &p2);
    /* llvmpipe ends every loop of an invocation once it has run 65535 iterations in all
     * (gallivm's LP_MAX_TGSI_LOOP_ITERATIONS), silently: the sequential passes then run in
     * windows that stay well under that. KLA_VULKAN_LOOP_CAP=n sets the cap (0: none), to
     * test the windows on any device. */
    c->loop_cap = strstr(c->props.deviceName, "llvmpipe") ? 40000 : 0;
    const char *np = getenv("KLA_VULKAN_PASSES");
    char *npe = NULL;
    c->passes = np && *np ? (int)strtol(np, &npe, 10) : 1;
    if ((npe && *npe) || c->passes < 1 || c->passes > 16) {
        snprintf(err, errlen, "KLA_VULKAN_PASSES=%s: expected an integer in [1, 16]", np);
        vk_close(c);
        return KLA_EINVAL;
    }
    const char *lc = getenv("KLA_VULKAN_LOOP_CAP");
    if (lc && *lc) c->loop_cap = strtoll(lc, NULL, 10) > 0 ? strtoll(lc, NULL, 10) : 0;
    c->subgroup = (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) &&
                  (sg.supportedOperations & VK_SUBGROUP_FEATURE_ARITHMETIC_BIT) &&
                  (sg.supportedOperations & VK_SUBGROUP_FEATURE_BASIC_BIT) && sg.subgroupSize >= 4 &&
                  !env_on("KLA_VULKAN_NO_SUBGROUP");
    /* map everything directly unless the device is discrete (where device-local memory
     * read by the host crosses the bus); KLA_VULKAN_STAGING=1 forces the discrete path
     * (device-local buffers, staging copies), to test it on any device */
    c->direct = c->props.deviceType != VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU && !env_on("KLA_VULKAN_STAGING");
    if (c->direct) {
        int ok = 0;
        for (uint32_t i = 0; i < c->mem.memoryTypeCount; i++) {
            VkMemoryPropertyFlags f = c->mem.memoryTypes[i].propertyFlags;
            if ((f & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT) && (f & VK_MEMORY_PROPERTY_HOST_COHERENT_BIT)) ok = 1;
        }
        c->direct = ok;
    }
    if (c->props.limits.maxPerStageDescriptorStorageBuffers < NBIND) {
        snprintf(err, errlen, "Vulkan device allows %u storage buffers per stage, needs %d",
                 c->props.limits.maxPerStageDescriptorStorageBuffers, NBIND);
        vk_close(c);
        return KLA_ENODEV;
    }

    if (!c->external) {
    /* device extensions: the portability subset where the device has it (MoltenVK; the
     * spec requires enabling it), pipeline statistics when asked for */
    const char *dexts[2];
    uint32_t ndx = 0, nde = 0;
    VkExtensionProperties *de = NULL;
    if (vkEnumerateDeviceExtensionProperties(c->pd, NULL, &nde, NULL) == VK_SUCCESS && nde &&
        (de = calloc(nde, sizeof *de)) != NULL &&
        vkEnumerateDeviceExtensionProperties(c->pd, NULL, &nde, de) != VK_SUCCESS)
        nde = 0;
    if (has_ext(de, nde, "VK_KHR_portability_subset")) dexts[ndx++] = "VK_KHR_portability_subset";
    VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR pef = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR,
        .pipelineExecutableInfo = VK_TRUE };
    if (env_on("KLA_VULKAN_PIPELINE_STATS")) {
        if (has_ext(de, nde, VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME)) {
            dexts[ndx++] = VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME;
            c->stats = 1;
        } else
            fprintf(stderr, "kla vulkan: %s has no %s: no pipeline statistics\n", c->props.deviceName,
                    VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME);
    }
    free(de);
    const float prio = 1.0f;
    VkDeviceQueueCreateInfo qi = { .sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                   .queueFamilyIndex = c->qfam, .queueCount = 1, .pQueuePriorities = &prio };
    VkDeviceCreateInfo di = { .sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, .queueCreateInfoCount = 1,
                              .pNext = c->stats ? &pef : NULL, .pQueueCreateInfos = &qi,
                              .enabledExtensionCount = ndx, .ppEnabledExtensionNames = dexts };
    CHECK(vkCreateDevice(c->pd, &di, NULL, &c->dev), "vkCreateDevice");
    vkGetDeviceQueue(c->dev, c->qfam, 0, &c->queue);
    }

    VkCommandPoolCreateInfo pci = { .sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                    .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                    .queueFamilyIndex = c->qfam };
    CHECK(vkCreateCommandPool(c->dev, &pci, NULL, &c->pool), "vkCreateCommandPool");
    VkCommandBufferAllocateInfo cai = { .sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                        .commandPool = c->pool, .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                        .commandBufferCount = 1 };
    CHECK(vkAllocateCommandBuffers(c->dev, &cai, &c->cb), "vkAllocateCommandBuffers");
    VkFenceCreateInfo fi = { .sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO };
    CHECK(vkCreateFence(c->dev, &fi, NULL, &c->fence), "vkCreateFence");
    {
        uint32_t nf = 0;
        VkQueueFamilyProperties qp[32];
        vkGetPhysicalDeviceQueueFamilyProperties(c->pd, &nf, NULL);
        if (nf > 32) nf = 32;
        vkGetPhysicalDeviceQueueFamilyProperties(c->pd, &nf, qp);
        VkQueryPoolCreateInfo qci = { .sType = VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO,
                                      .queryType = VK_QUERY_TYPE_TIMESTAMP, .queryCount = NSTAMPS };
        if (c->qfam < nf && qp[c->qfam].timestampValidBits && c->props.limits.timestampPeriod > 0 &&
            vkCreateQueryPool(c->dev, &qci, NULL, &c->timer) == VK_SUCCESS)
            c->tick_ns = c->props.limits.timestampPeriod;
        else
            c->timer = VK_NULL_HANDLE;
    }

    VkDescriptorSetLayoutBinding lb[NBIND];
    for (int i = 0; i < NBIND; i++)
        lb[i] = (VkDescriptorSetLayoutBinding){ (uint32_t)i, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1,
                                                VK_SHADER_STAGE_COMPUTE_BIT, NULL };
    VkDescriptorSetLayoutCreateInfo lci = { .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                                            .bindingCount = NBIND, .pBindings = lb };
    CHECK(vkCreateDescriptorSetLayout(c->dev, &lci, NULL, &c->dsl), "vkCreateDescriptorSetLayout");
    VkPushConstantRange pr = { VK_SHADER_STAGE_COMPUTE_BIT, 0, sizeof(pconst) };
    VkPipelineLayoutCreateInfo plci = { .sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
                                        .setLayoutCount = 1, .pSetLayouts = &c->dsl,
                                        .pushConstantRangeCount = 1, .pPushConstantRanges = &pr };
    CHECK(vkCreatePipelineLayout(c->dev, &plci, NULL, &c->pl), "vkCreatePipelineLayout");
    VkDescriptorPoolSize ps = { VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, NBIND + 2 * NCONV };
    VkDescriptorPoolCreateInfo dpci = { .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO,
                                        .maxSets = 1 + NCONV, .poolSizeCount = 1, .pPoolSizes = &ps };
    CHECK(vkCreateDescriptorPool(c->dev, &dpci, NULL, &c->dpool), "vkCreateDescriptorPool");
    VkDescriptorSetAllocateInfo dsai = { .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO,
                                         .descriptorPool = c->dpool, .descriptorSetCount = 1,
                                         .pSetLayouts = &c->dsl };
    CHECK(vkAllocateDescriptorSets(c->dev, &dsai, &c->set), "vkAllocateDescriptorSets");
    /* convert.comp (16-bit tensors): a layout of its own, two bindings, two push constants */
    {
        VkDescriptorSetLayoutBinding cb2[2];
        for (int i = 0; i < 2; i++)
            cb2[i] = (VkDescriptorSetLayoutBinding){ (uint32_t)i, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1,
                                                     VK_SHADER_STAGE_COMPUTE_BIT, NULL };
        VkDescriptorSetLayoutCreateInfo cl = { .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                                               .bindingCount = 2, .pBindings = cb2 };
        CHECK(vkCreateDescriptorSetLayout(c->dev, &cl, NULL, &c->conv_dsl), "vkCreateDescriptorSetLayout");
        VkPushConstantRange cpr = { VK_SHADER_STAGE_COMPUTE_BIT, 0, 8 };
        VkPipelineLayoutCreateInfo cpl = { .sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
                                           .setLayoutCount = 1, .pSetLayouts = &c->conv_dsl,
                                           .pushConstantRangeCount = 1, .pPushConstantRanges = &cpr };
        CHECK(vkCreatePipelineLayout(c->dev, &cpl, NULL, &c->conv_pl), "vkCreatePipelineLayout");
        VkDescriptorSetLayout ls[NCONV];
        for (int i = 0; i < NCONV; i++) ls[i] = c->conv_dsl;
        VkDescriptorSetAllocateInfo ca = { .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO,
                                           .descriptorPool = c->dpool, .descriptorSetCount = NCONV, .pSetLayouts = ls };
        CHECK(vkAllocateDescriptorSets(c->dev, &ca, c->conv_set), "vkAllocateDescriptorSets");
        VkShaderModuleCreateInfo cm = { .sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
                                        .codeSize = sizeof spv_convert, .pCode = spv_convert };
        CHECK(vkCreateShaderModule(c->dev, &cm, NULL, &c->conv_mod), "vkCreateShaderModule");
        VkComputePipelineCreateInfo cp = {
            .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
            .stage = { .sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO, .stage = VK_SHADER_STAGE_COMPUTE_BIT,
                       .module = c->conv_mod, .pName = "main" },
            .layout = c->conv_pl };
        CHECK(vkCreateComputePipelines(c->dev, VK_NULL_HANDLE, 1, &cp, NULL, &c->conv_pipe), "vkCreateComputePipelines");
    }

    struct { const uint32_t *code; size_t size; } src[NSHADERS] = {
        [SH_PREP] = { c->subgroup ? spv_prep_sg : spv_prep_sh, c->subgroup ? sizeof spv_prep_sg : sizeof spv_prep_sh },
        [SH_POST] = { c->subgroup ? spv_post_sg : spv_post_sh, c->subgroup ? sizeof spv_post_sg : sizeof spv_post_sh },
        [SH_REC_FWD] = { spv_rec_fwd, sizeof spv_rec_fwd },
        [SH_REC_BWD] = { spv_rec_bwd, sizeof spv_rec_bwd },
        [SH_REC_DSTATE] = { spv_rec_dstate, sizeof spv_rec_dstate },
        [SH_CHUNK_PREP] = { spv_chunk_prep, sizeof spv_chunk_prep },
        [SH_CHUNK_STATE] = { spv_chunk_state, sizeof spv_chunk_state },
        [SH_CHUNK_OUT] = { spv_chunk_out, sizeof spv_chunk_out },
        [SH_CHUNK_DSTATE] = { spv_chunk_dstate, sizeof spv_chunk_dstate },
        [SH_CHUNK_BWDV] = { spv_chunk_bwdv, sizeof spv_chunk_bwdv },
        [SH_CHUNK_BWD] = { spv_chunk_bwd, sizeof spv_chunk_bwd },
    };
    for (int i = 0; i < NSHADERS; i++) {
        VkShaderModuleCreateInfo mci = { .sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
                                         .codeSize = src[i].size, .pCode = src[i].code };
        CHECK(vkCreateShaderModule(c->dev, &mci, NULL, &c->mod[i]), "vkCreateShaderModule");
    }
    /* every binding gets a buffer, so a descriptor set is always fully written */
    for (int i = 0; i < NBIND; i++)
        if (buf_ensure(c, &c->b[i], 256, c->direct)) {
            snprintf(err, errlen, "Vulkan: out of device memory");
            vk_close(c);
            return KLA_ENOMEM;
        }
    *state = c;
    return 0;
}

/* ---- one call: uploads, dispatches, downloads ---------------------------------------- */

typedef struct xfer {
    vbuf *b; /* the device side */
    void *host; /* source (upload) or destination (download) */
    VkDeviceSize bytes, off; /* off: in the staging buffer */
} xfer;

typedef struct call {
    vkctx *c;
    xfer up[16], down[16];
    int nup, ndown;
    int recording;
    int quiet;       /* a pass that is not timed (KLA_VULKAN_PASSES) */
    uint32_t nstamp; /* timestamps written */
    const char *name[NSTAMPS]; /* name[i]: the dispatch that timestamp i ends */
    /* bindings held in a buffer of the caller's (a KlaState, a KlaBuffer): bound as they
     * are, no transfers */
    const vbuf *ext[NBIND];
    /* bindings whose tensor is a 16-bit buffer of the caller's: the binding's own float32
     * buffer is widened from it (inputs) or narrowed into it (outputs) by convert.comp */
    const vbuf *h16[NBIND];
    unsigned char bf[NBIND]; /* 1: bfloat16, 0: binary16 */
    unsigned char host16[NBIND]; /* a host tensor in 16 bits (bf[] says which) */
    struct { int bind, out; int64_t n; } conv[NCONV];
    int nconv;
    const int32_t *offs; /* uploaded by this call: cached once it completes */
    int64_t noffs;
} call;

/* the caller's buffers of a call, by binding (ext_from) */
typedef struct extb {
    const vbuf *ext[NBIND], *h16[NBIND];
    unsigned char bf[NBIND], host16[NBIND];
} extb;

static void take_ext(call *k, const extb *e)
{
    memcpy(k->ext, e->ext, sizeof k->ext);
    memcpy(k->h16, e->h16, sizeof k->h16);
    memcpy(k->bf, e->bf, sizeof k->bf);
    memcpy(k->host16, e->host16, sizeof k->host16);
}

/* A conversion between binding `bind`'s float32 buffer and its 16-bit one. */
static int add_conv(call *k, int bind, int out, VkDeviceSize bytes)
{
    if (k->nconv == NCONV) return KLA_ENOMEM;
    k->conv[k->nconv].bind = bind, k->conv[k->nconv].out = out, k->conv[k->nconv].n = (int64_t)(bytes / 4);
    k->nconv++;
    return 0;
}

/* Binding `bind` holds `bytes` for this call. */
static int need(call *k, int bind, VkDeviceSize bytes)
{
    vkctx *c = k->c;
    if (k->ext[bind]) { /* sized by the glue's checks */
        c->used[bind] = bytes;
        return 0;
    }
    if (bytes > c->props.limits.maxStorageBufferRange)
        return kla__fail(kla__current, KLA_ENOMEM,
                         "backend vulkan: binding %s needs %llu bytes, over the device's "
                         "maxStorageBufferRange of %u bytes (a smaller T, B or heads per call)",
                         bind_name(bind), (unsigned long long)bytes, c->props.limits.maxStorageBufferRange);
    int r = buf_ensure(c, &c->b[bind], bytes, c->direct);
    if (!r) c->used[bind] = bytes;
    return r;
}

/* A host tensor in 16 bits (k->host16): its bytes go to the binding's 16-bit buffer,
 * widened (or narrowed from) on the GPU like a 16-bit KlaBuffer. */
static int host16(call *k, int bind, VkDeviceSize bytes)
{
    vkctx *c = k->c;
    int r = buf_ensure(c, &c->b16[bind], (bytes / 2 + 3) & ~(VkDeviceSize)3, c->direct);
    if (!r) k->h16[bind] = &c->b16[bind];
    return r;
}

static int upload(call *k, int bind, const void *host, VkDeviceSize bytes)
{
    int r = need(k, bind, bytes);
    if (r || !host || k->ext[bind]) return r;
    if (k->host16[bind]) {
        if ((r = host16(k, bind, bytes))) return r;
        k->up[k->nup++] = (xfer){ &k->c->b16[bind], (void *)host, bytes / 2, 0 };
    }
    if (k->h16[bind]) return add_conv(k, bind, 0, bytes);
    k->up[k->nup++] = (xfer){ &k->c->b[bind], (void *)host, bytes, 0 };
    return 0;
}

static int download(call *k, int bind, void *host, VkDeviceSize bytes)
{
    if (!host || k->ext[k->c->alias[bind]]) return 0;
    if (k->host16[bind]) {
        int r = host16(k, bind, bytes);
        if (r) return r;
        k->down[k->ndown++] = (xfer){ &k->c->b16[bind], host, bytes / 2, 0 };
    }
    if (k->h16[bind]) return add_conv(k, bind, 1, bytes);
    k->down[k->ndown++] = (xfer){ &k->c->b[k->c->alias[bind]], host, bytes, 0 };
    return 0;
}

/* Writes the descriptor set, copies the uploads, begins the command buffer. */
static int begin(call *k)
{
    vkctx *c = k->c;
    VkDeviceSize st = 0;
    for (int i = 0; i < k->nup; i++) k->up[i].off = st, st += (k->up[i].bytes + 255) & ~(VkDeviceSize)255;
    for (int i = 0; i < k->ndown; i++) k->down[i].off = st, st += (k->down[i].bytes + 255) & ~(VkDeviceSize)255;
    if (!c->direct && st && buf_ensure(c, &c->staging, st, 1)) return KLA_ENOMEM;
    for (int i = 0; i < k->nup; i++) {
        const xfer *x = &k->up[i];
        void *dst = c->direct ? x->b->map : (char *)c->staging.map + x->off;
        memcpy(dst, x->host, (size_t)x->bytes);
    }
    VkDescriptorBufferInfo bi[NBIND];
    VkWriteDescriptorSet w[NBIND];
    for (int i = 0; i < NBIND; i++) {
        const int s = c->alias[i];
        VkDeviceSize range = c->used[s] ? c->used[s] : 256;
        bi[i] = k->ext[s] ? (VkDescriptorBufferInfo){ k->ext[s]->buf, k->ext[s]->off, range }
                          : (VkDescriptorBufferInfo){ c->b[s].buf, 0, range };
        w[i] = (VkWriteDescriptorSet){ .sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, .dstSet = c->set,
                                       .dstBinding = (uint32_t)i, .descriptorCount = 1,
                                       .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, .pBufferInfo = &bi[i] };
    }
    vkUpdateDescriptorSets(c->dev, NBIND, w, 0, NULL);
    for (int i = 0; i < k->nconv; i++) {
        const int b = k->conv[i].bind;
        const VkDeviceSize n = (VkDeviceSize)k->conv[i].n;
        const vbuf *h = k->h16[b];
        VkDescriptorBufferInfo ci[2] = { { h->buf, h->off, (n * 2 + 3) & ~(VkDeviceSize)3 }, { c->b[b].buf, 0, n * 4 } };
        VkWriteDescriptorSet cw[2];
        for (int j = 0; j < 2; j++)
            cw[j] = (VkWriteDescriptorSet){ .sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, .dstSet = c->conv_set[i],
                                            .dstBinding = (uint32_t)j, .descriptorCount = 1,
                                            .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, .pBufferInfo = &ci[j] };
        vkUpdateDescriptorSets(c->dev, 2, cw, 0, NULL);
    }
    if (begin_cb(c)) return KLA_EIO;
    k->recording = 1;
    c->epoch++; /* pipelines fetched from here on are used by this command buffer */
    if (!c->direct && k->nup) {
        for (int i = 0; i < k->nup; i++) {
            VkBufferCopy bc = { k->up[i].off, 0, k->up[i].bytes };
            vkCmdCopyBuffer(c->cb, c->staging.buf, k->up[i].b->buf, 1, &bc);
        }
        barrier(c->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT,
                VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
    }
    vkCmdBindDescriptorSets(c->cb, VK_PIPELINE_BIND_POINT_COMPUTE, c->pl, 0, 1, &c->set, 0, NULL);
    if (c->timer) vkCmdResetQueryPool(c->cb, c->timer, 0, NSTAMPS);
    return 0;
}

/* Starts pass `pass` of `n` of a call's dispatches; only the last is timed. Every pass
 * recomputes the same outputs from the inputs, so repeating them changes nothing but the
 * time: a benchmark (KLA_VULKAN_PASSES) times the last pass, with the GPU at full clock
 * after the first ones, as it is when a training step follows another. */
static void record_conv(call *k, int out);

static void pass_start(call *k, int pass, int n)
{
    vkctx *c = k->c;
    k->quiet = pass < n - 1;
    if (c->timer && !k->quiet) {
        /* after earlier passes: when they have completed (the barrier after each dispatch) */
        vkCmdWriteTimestamp(c->cb, pass ? VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT : VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT,
                            c->timer, 0);
        k->nstamp = 1;
    }
    if (pass == 0) record_conv(k, 0); /* 16-bit inputs widened once */
}

/* The conversions of one direction (inputs widened, or outputs narrowed), a barrier,
 * a timestamp ("widen", "narrow"); the call's descriptor set bound again after. */
static void record_conv(call *k, int out)
{
    vkctx *c = k->c;
    int any = 0;
    for (int i = 0; i < k->nconv; i++) {
        if (k->conv[i].out != out) continue;
        if (!any) vkCmdBindPipeline(c->cb, VK_PIPELINE_BIND_POINT_COMPUTE, c->conv_pipe);
        any = 1;
        const int b = k->conv[i].bind;
        const uint32_t pcv[2] = { (uint32_t)k->conv[i].n, (out ? 2u : 0u) + k->bf[b] };
        vkCmdBindDescriptorSets(c->cb, VK_PIPELINE_BIND_POINT_COMPUTE, c->conv_pl, 0, 1, &c->conv_set[i], 0, NULL);
        vkCmdPushConstants(c->cb, c->conv_pl, VK_SHADER_STAGE_COMPUTE_BIT, 0, sizeof pcv, pcv);
        const uint64_t groups = ((uint64_t)k->conv[i].n + 127) / 128; /* 64 words of 2 elements */
        const uint32_t maxx = c->props.limits.maxComputeWorkGroupCount[0];
        const uint32_t x = groups > maxx ? maxx : (uint32_t)groups, y = (uint32_t)((groups + x - 1) / x);
        vkCmdDispatch(c->cb, x, y, 1);
    }
    if (!any) return;
    barrier(c->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
            VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
    if (c->timer && !k->quiet && k->nstamp < NSTAMPS - 1) {
        k->name[k->nstamp] = out ? "narrow" : "widen";
        vkCmdWriteTimestamp(c->cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, c->timer, k->nstamp++);
    }
    if (!out) vkCmdBindDescriptorSets(c->cb, VK_PIPELINE_BIND_POINT_COMPUTE, c->pl, 0, 1, &c->set, 0, NULL);
}

/* Records one dispatch, then a barrier so the next one sees its writes. gx may be large:
 * it is folded into x and y (the shaders use flat_group() where that matters). */
static int dispatch(call *k, VkPipeline p, const pconst *pc, uint64_t gx, uint32_t gy, uint32_t gz)
{
    vkctx *c = k->c;
    if (!p) return KLA_EIO;
    if (!gx || !gy || !gz) return 0;
    const uint32_t maxx = c->props.limits.maxComputeWorkGroupCount[0];
    uint32_t x = (uint32_t)gx, y = gy;
    if (gx > maxx) { /* only for 1-D grids */
        if (gy != 1) return KLA_ENOMEM;
        x = maxx;
        y = (uint32_t)((gx + maxx - 1) / maxx);
    }
    if (y > c->props.limits.maxComputeWorkGroupCount[1] || gz > c->props.limits.maxComputeWorkGroupCount[2])
        return KLA_ENOMEM;
    vkCmdBindPipeline(c->cb, VK_PIPELINE_BIND_POINT_COMPUTE, p);
    vkCmdPushConstants(c->cb, c->pl, VK_SHADER_STAGE_COMPUTE_BIT, 0, sizeof *pc, pc);
    vkCmdDispatch(c->cb, x, y, gz);
    if (c->timer && !k->quiet && k->nstamp < NSTAMPS - 1) {
        k->name[k->nstamp] = c->pipe_name;
        vkCmdWriteTimestamp(c->cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, c->timer, k->nstamp++);
    }
    barrier(c->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
            VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
    return 0;
}

/* Downloads, submits, waits, copies the outputs out. */
static int finish(call *k)
{
    vkctx *c = k->c;
    record_conv(k, 1); /* 16-bit outputs narrowed */
    if (c->timer) vkCmdWriteTimestamp(c->cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, c->timer, k->nstamp++);
    if (!c->direct && k->ndown) {
        barrier(c->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
                VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_READ_BIT);
        for (int i = 0; i < k->ndown; i++) {
            VkBufferCopy bc = { 0, k->down[i].off, k->down[i].bytes };
            vkCmdCopyBuffer(c->cb, k->down[i].b->buf, c->staging.buf, 1, &bc);
        }
        barrier(c->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT,
                VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_READ_BIT);
    } else {
        barrier(c->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
                VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_READ_BIT);
    }
    k->recording = 0;
    if (vkEndCommandBuffer(c->cb) != VK_SUCCESS) return KLA_EIO;
    VkSubmitInfo si = { .sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .commandBufferCount = 1, .pCommandBuffers = &c->cb };
    if (vkResetFences(c->dev, 1, &c->fence) != VK_SUCCESS ||
        vkQueueSubmit(c->queue, 1, &si, c->fence) != VK_SUCCESS ||
        vkWaitForFences(c->dev, 1, &c->fence, VK_TRUE, UINT64_MAX) != VK_SUCCESS)
        return KLA_EIO;
    uint64_t ts[NSTAMPS];
    c->gpu_ms = -1;
    c->nsplit = 0;
    if (c->timer && k->nstamp >= 2 &&
        vkGetQueryPoolResults(c->dev, c->timer, 0, k->nstamp, sizeof ts, ts, 8, VK_QUERY_RESULT_64_BIT) == VK_SUCCESS) {
        c->gpu_ms = (double)(ts[k->nstamp - 1] - ts[0]) * c->tick_ns * 1e-6;
        for (uint32_t i = 1; i + 1 < k->nstamp; i++) {
            c->split_name[c->nsplit] = k->name[i];
            c->split_ms[c->nsplit++] = (double)(ts[i] - ts[i - 1]) * c->tick_ns * 1e-6;
        }
    }
    if (k->offs) {
        int32_t *oc = realloc(c->offs_cache, (size_t)k->noffs * sizeof *oc);
        if (oc) {
            memcpy(oc, k->offs, (size_t)k->noffs * sizeof *oc);
            c->offs_cache = oc, c->noffs_cache = k->noffs, c->offs_buf = c->b[B_OFFS].buf;
        }
    }
    for (int i = 0; i < k->ndown; i++) {
        const xfer *x = &k->down[i];
        const void *src = c->direct ? x->b->map : (char *)c->staging.map + x->off;
        memcpy(x->host, src, (size_t)x->bytes);
    }
    return 0;
}

/* Ends a failed call: a command buffer left recording is ended and never submitted. */
static int abandon(call *k, int r)
{
    if (k->recording) vkEndCommandBuffer(k->c->cb);
    k->recording = 0;
    return r;
}

/* ---- sizes and common setup ------------------------------------------------------------- */

/* Invocations (= columns of S) per recurrent workgroup: 32, fewer when V is small. */
static uint32_t rec_wg(int64_t V)
{
    uint32_t w = 32;
    while (w > 1 && w / 2 >= V) w /= 2;
    return w;
}

typedef struct plan {
    pconst pc;
    int64_t N, total, H, HV, K, V;
    uint32_t wg, nvb, ck, bwg;  /* forward columns per group; checkpoint interval; bwd group */
    int64_t nseg;               /* checkpoint slots (or chunks) over all sequences */
    int64_t maxlen, maxseg;     /* the longest sequence: tokens, segments (or chunks) */
    int32_t *offs;
    int64_t noffs;
} plan;

static int make_plan(vkctx *c, const kla_problem *p, int backward, uint32_t chunk, plan *P)
{
    memset(P, 0, sizeof *P);
    P->N = p->N, P->total = p->total, P->H = p->H, P->HV = p->HV, P->K = p->K, P->V = p->V;
    /* 32-bit indices in the shaders; S columns of K floats in registers; V columns of a
     * head in one workgroup */
    if (p->total >= INT32_MAX / 2 || p->N >= INT32_MAX / 4 || p->K > 256 || p->V > 1024)
        return KLA_ENOMEM;
    const uint32_t shm = c->props.limits.maxComputeSharedMemorySize;
    P->wg = rec_wg(p->V);
    P->ck = chunk ? chunk : 16;
    P->bwg = P->wg;
    if (backward) {
        /* rec_bwd's shared memory: q, k, alpha, beta of CK tokens, a K x (WG+1) tile, 2 WG */
        for (;;) {
            uint64_t bytes = 4ull * (2ull * P->ck * p->K + 2 * P->ck + (uint64_t)p->K * (P->bwg + 1) + 2 * P->bwg);
            if (bytes <= shm) break;
            if (P->bwg > 8) P->bwg /= 2;
            else if (P->ck > 4) P->ck /= 2;
            else if (P->bwg > 1) P->bwg /= 2;
            else return KLA_ENOMEM;
        }
    }
    const uint32_t wv = backward ? P->bwg : P->wg;
    P->nvb = (uint32_t)((p->V + wv - 1) / wv);
    int64_t seg = 0;
    for (int64_t n = 0; n < p->N; n++) {
        const int64_t len = p->cu[n + 1] - p->cu[n], ns = (len + P->ck - 1) / P->ck;
        seg += ns;
        if (len > P->maxlen) P->maxlen = len;
        if (ns > P->maxseg) P->maxseg = ns;
    }
    P->nseg = seg;
    /* cu, first segment (chunk) of each sequence, and with chunk: [start, end) per chunk */
    P->noffs = 2 * p->N + 2 + (chunk ? 2 * seg : 0);
    if (P->noffs >= INT32_MAX / 4 || !(P->offs = malloc((size_t)P->noffs * sizeof *P->offs)))
        return KLA_ENOMEM;
    seg = 0;
    for (int64_t n = 0; n <= p->N; n++) {
        P->offs[n] = (int32_t)p->cu[n];
        P->offs[p->N + 1 + n] = (int32_t)seg;
        if (n == p->N) break;
        for (int64_t t = p->cu[n]; t < p->cu[n + 1]; t += P->ck, seg++)
            if (chunk) {
                P->offs[2 * p->N + 2 + 2 * seg] = (int32_t)t;
                P->offs[2 * p->N + 3 + 2 * seg] = (int32_t)(t + P->ck < p->cu[n + 1] ? t + P->ck : p->cu[n + 1]);
            }
    }
    P->pc = (pconst){ .N = (int32_t)p->N, .H = (int32_t)p->H, .HV = (int32_t)p->HV,
                      .total = (int32_t)p->total, .grp = (int32_t)(p->HV / p->H),
                      .nvb = (int32_t)P->nvb, .mode = p->mode == KLA_MODE_GDN,
                      .flags = (p->l2norm_q ? F_L2Q : 0) | (p->l2norm_k ? F_L2K : 0),
                      .scale = (float)p->scale, .eps = (float)p->eps, .w0 = 0, .w1 = INT32_MAX };
    return 0;
}

/* The window of a sequential pass on a loop-capped device (c->loop_cap): items (tokens,
 * chunks or segments) per dispatch when one item costs an invocation about per_item loop
 * iterations, a multiple of align; 0 when the pass fits in one dispatch of n items. */
static int64_t window_len(const vkctx *c, int64_t per_item, int64_t align, int64_t n)
{
    if (!c->loop_cap || n * per_item <= c->loop_cap) return 0;
    int64_t w = c->loop_cap / per_item / align * align;
    return w < align ? align : w;
}

/* A sequential pass as one dispatch, or with window w as dispatches over [0, n) in steps
 * of w (last window first when reverse), each seeing pc.w0, pc.w1. */
static int dispatch_seq(call *k, VkPipeline p, const pconst *pc, uint64_t gx, uint32_t gy, uint32_t gz,
                        int64_t w, int64_t n, int reverse)
{
    if (!w) return dispatch(k, p, pc, gx, gy, gz);
    pconst q = *pc;
    const int64_t nw = (n + w - 1) / w;
    for (int64_t i = 0; i < nw; i++) {
        const int64_t x = reverse ? nw - 1 - i : i;
        q.w0 = (int32_t)(x * w), q.w1 = (int32_t)(x * w + w);
        int r = dispatch(k, p, &q, gx, gy, gz);
        if (r) return r;
    }
    return 0;
}

static void reset_bindings(vkctx *c)
{
    for (int i = 0; i < NBIND; i++) c->used[i] = 0, c->alias[i] = i;
}

/* prep: qhat, khat, norms, beta. q, k, a (and the scratch outputs) must be bound. */
static int run_prep(call *k, const plan *P)
{
    vkctx *c = k->c;
    VkPipeline pp = get_pipe(c, SH_PREP, 64, (uint32_t)P->K, 0, 0, 0);
    return dispatch(k, pp, &P->pc, (uint64_t)(P->total * P->H), 1, 1);
}

static int bind_prep(call *k, const plan *P, const float *q, const float *kk, const float *a)
{
    const VkDeviceSize f = 4, nq = (VkDeviceSize)(P->total * P->H * P->K) * f;
    int r;
    if ((r = upload(k, B_Q, q, nq)) || (r = upload(k, B_K, kk, nq)) ||
        (r = upload(k, B_A, a, (VkDeviceSize)(P->total * P->HV) * f)) || (r = need(k, B_QH, nq)) ||
        (r = need(k, B_KH, nq)) || (r = need(k, B_NRM, (VkDeviceSize)(3 * P->total * P->H) * f)) ||
        (r = need(k, B_BETA, (VkDeviceSize)(P->total * P->HV) * f)))
        return r;
    /* the offsets (sequences, chunks) of the last call that completed are still in the
     * binding: a call on the same sequences uploads nothing (resident calls move no data) */
    vkctx *c = k->c;
    const VkDeviceSize ob = (VkDeviceSize)P->noffs * 4;
    if (c->noffs_cache == P->noffs && c->offs_buf == c->b[B_OFFS].buf && !memcmp(c->offs_cache, P->offs, (size_t)ob))
        return need(k, B_OFFS, ob);
    c->noffs_cache = 0; /* unknown until this call completes */
    if ((r = upload(k, B_OFFS, P->offs, ob))) return r;
    k->offs = P->offs, k->noffs = P->noffs;
    return 0;
}

/* ---- the entry points ------------------------------------------------------------------------ */

/* chunk_state and chunk_dstate tiling (same shared memory, see their headers): vb columns
 * of S per workgroup, the K rows in quads over at most 32 row groups, a shared tile of tt
 * tokens (K-sized rows of ks quads), S0 transposed (vb rows of ks quads), vnew of the chunk
 * (C x vb), at most 64 tile elements per invocation. Returns the workgroup size (0: none). */
static uint32_t cstate_fit(const vkctx *c, int64_t K, int64_t V, uint32_t C, uint32_t *vb, uint32_t *tt)
{
    const uint64_t shm = c->props.limits.maxComputeSharedMemorySize;
    const uint32_t q = (uint32_t)(K + 3) / 4, qpt = (q + 31) / 32, nr = (q + qpt - 1) / qpt, ks = (nr * qpt) | 1;
    for (*vb = 16; *vb > 2 && *vb / 2 >= V; *vb /= 2) {}
    for (;; *vb /= 2) {
        const uint32_t wg = nr * (*vb / 2);
        for (*tt = C; *tt >= 1; *tt /= 2) {
            const uint64_t nt = (C + *tt - 1) / *tt;
            if (16ull * ks * (*tt + *vb) + 4ull * nt * *tt * *vb <= shm && (uint64_t)*tt * 4 * q <= 64ull * wg &&
                wg <= c->props.limits.maxComputeWorkGroupInvocations && wg <= c->props.limits.maxComputeWorkGroupSize[0])
                return wg;
        }
        if (*vb <= 2) return 0;
    }
}

static int vk_forward_impl(vkctx *c, const kla_problem *p, int *algo, const float *q,
                           const float *kk, const float *v, const float *g, const float *a,
                           const float *h0, float *o, float *ht, int decode, const extb *ext)
{
    /* the chunkwise kernels unless recurrent was asked for; chunks above 64 tokens are
     * run as 64 (the same result: the chunk size only groups the arithmetic) */
    const uint32_t C = p->chunk > 64 ? 64 : (uint32_t)p->chunk;
    /* chunk_prep, chunk_out: rows padded to cp, 16-deep tiles of 4096 / cp (+4) columns */
    const uint64_t cp = C <= 16 ? 16 : C <= 32 ? 32 : 64, cvb = 4096 / cp;
    const uint64_t shm_prep = 4ull * (cp * (cp + 4) + 16 * (cvb + 4) + (cp > 16 ? (cp / 16 - 1) * 256 : 1) + 3 * cp);
    const uint64_t shm_out = 4ull * (cp * (cp + 4) + 32 * (cp + 4) + 16 * (cvb + 4) + cp);
    uint32_t vb = 2, tt = 1;
    const uint32_t swg = cstate_fit(c, p->K, p->V, C, &vb, &tt);
    const int chunk = !decode && *algo != KLA_ALGO_RECURRENT &&
                      shm_prep <= c->props.limits.maxComputeSharedMemorySize &&
                      shm_out <= c->props.limits.maxComputeSharedMemorySize && swg;
    *algo = chunk ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;
    plan P;
    int r = make_plan(c, p, 0, chunk ? C : 0, &P);
    if (r) {
        free(P.offs);
        return r;
    }
    call k = { .c = c };
    if (ext) take_ext(&k, ext);
    reset_bindings(c);
    const VkDeviceSize f = 4, nv = (VkDeviceSize)(P.total * P.HV * P.V) * f;
    const VkDeviceSize nst = (VkDeviceSize)(P.N * P.HV * P.K * P.V) * f;
    /* rec_fwd in windows of tokens, chunk_state of chunks, on a loop-capped device: the
     * state is carried in ht */
    const int64_t wrec = chunk ? window_len(c, P.K + 4 * C + 64, 1, P.maxseg) : window_len(c, 3 * P.K + 8, 16, P.maxlen);
    P.pc.flags |= (g ? F_G : 0) | (h0 ? F_H0 : 0) | (ht || wrec ? F_HT : 0);
    if ((r = bind_prep(&k, &P, q, kk, a)) || (r = upload(&k, B_V, v, nv)) ||
        (r = upload(&k, B_G, g, g ? (VkDeviceSize)(P.total * P.HV) * f : 0)) ||
        (r = upload(&k, B_H0, h0, h0 ? nst : 0)) || (r = need(&k, B_O, nv)) ||
        (r = decode ? 0 : need(&k, B_HT, ht || wrec ? nst : 0)))
        goto out;
    if (decode) c->alias[B_HT] = B_H0; /* the state is read and written in place */
    download(&k, B_O, o, nv);
    download(&k, decode ? B_H0 : B_HT, ht, nst);

    if (chunk) {
        if (P.nseg > c->props.limits.maxComputeWorkGroupCount[0]) {
            r = KLA_ENOMEM;
            goto out;
        }
        if ((r = need(&k, B_W, (VkDeviceSize)(P.total * P.HV * P.K) * f)) || (r = need(&k, B_U, nv)) ||
            (r = need(&k, B_VN, nv)) || (r = need(&k, B_HS, (VkDeviceSize)P.nseg * P.HV * P.K * P.V * f)) ||
            (r = need(&k, B_GC, (VkDeviceSize)(P.total * P.HV) * f)))
            goto out;
    }
    if ((r = begin(&k))) goto out;
    /* decode updates the state in place: one pass */
    for (int pass = 0, np = decode ? 1 : c->passes; pass < np && !r; pass++) {
        pass_start(&k, pass, np);
        if ((r = run_prep(&k, &P))) goto out;
        if (chunk) {
            const uint32_t sp[3] = { (uint32_t)P.K, (uint32_t)P.V, C };
            if (!(r = dispatch(&k, get_pipe(c, SH_CHUNK_PREP, 256, sp[0], sp[1], sp[2], 0), &P.pc, (uint64_t)P.nseg,
                               (uint32_t)P.HV, 1)) &&
                !(r = dispatch_seq(&k, get_pipe(c, SH_CHUNK_STATE, swg, sp[0], sp[1], sp[2], tt), &P.pc,
                                   (P.V + vb - 1) / vb, (uint32_t)P.HV, (uint32_t)P.N, wrec, P.maxseg, 0)))
                r = dispatch(&k, get_pipe(c, SH_CHUNK_OUT, 256, sp[0], sp[1], sp[2], 0), &P.pc, (uint64_t)P.nseg,
                             (uint32_t)P.HV, 1);
    } else {
        uint32_t tb = 8;
        while (tb > 1 && 4ull * (2ull * tb * P.K + 2 * tb) > c->props.limits.maxComputeSharedMemorySize) tb /= 2;
        r = dispatch_seq(&k, get_pipe(c, SH_REC_FWD, P.wg, (uint32_t)P.K, (uint32_t)P.V, P.ck, tb), &P.pc,
                         P.nvb, (uint32_t)P.HV, (uint32_t)P.N, wrec, P.maxlen, 0);
    }
    }
    if (!r) r = finish(&k);
out:
    free(P.offs);
    return abandon(&k, r);
}

/* The bindings a call's KlaBuffers hold (io->resident): their vbufs, bound in place. */
static void ext_from(const kla_io *x, extb *e)
{
    const struct { unsigned bit; int bind; const void *p; } m[] = {
        { KLA_R_Q, B_Q, x->q }, { KLA_R_K, B_K, x->k }, { KLA_R_V, B_V, x->v }, { KLA_R_G, B_G, x->g },
        { KLA_R_A, B_A, x->a }, { KLA_R_H0, B_H0, x->h0 }, { KLA_R_DO, B_DO, x->dout },
        { KLA_R_DHT, B_DHT, x->dht }, { KLA_R_O, B_O, x->o }, { KLA_R_HT, B_HT, x->ht },
        { KLA_R_DQ, B_DQ, x->dq }, { KLA_R_DK, B_DK, x->dk }, { KLA_R_DV, B_DV, x->dv },
        { KLA_R_DG, B_DG, x->dg }, { KLA_R_DA, B_DA, x->da }, { KLA_R_DH0, B_DH0, x->dh0 },
        { KLA_R_STATE, B_H0, x->state }, /* decode: the state is bound as h0 (= ht) */
    };
    memset(e, 0, sizeof *e);
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        const unsigned bit = m[i].bit;
        const int half = ((x->f16 | x->bf16) & bit) != 0, res = (x->resident & bit) != 0;
        e->bf[m[i].bind] = (x->bf16 & bit) != 0;
        /* 16 bits: widened into (narrowed from) the binding's own float32 buffer, from the
         * caller's buffer (h16) or from its host data through a 16-bit one (host16) */
        if (half && res) e->h16[m[i].bind] = m[i].p;
        else if (half) e->host16[m[i].bind] = 1;
        else if (res) e->ext[m[i].bind] = m[i].p;
    }
}

static int vk_forward(void *state, const kla_problem *p, kla_io *x)
{
    extb ext;
    ext_from(x, &ext);
    return vk_forward_impl(state, p, &x->algo, x->q, x->k, x->v, x->g, x->a, x->h0, x->o, x->ht, 0, &ext);
}

static int vk_decode(void *state, const kla_problem *p, kla_io *x)
{
    /* one token per sequence with h0 = ht = the state */
    extb ext;
    ext_from(x, &ext);
    x->algo = KLA_ALGO_RECURRENT;
    return vk_forward_impl(state, p, &x->algo, x->q, x->k, x->v, x->g, x->a, x->state, x->o, x->state, 1, &ext);
}


static int vk_decode_state(void *state, const kla_problem *p, kla_io *x)
{
    x->resident |= KLA_R_STATE; /* x->state is the KlaState's vbuf */
    return vk_decode(state, p, x);
}

/*
 * The chunkwise backward (ref/kla_ref.c section 6), for KLA_ALGO_CHUNK and AUTO:
 *   prep, chunk_prep (also storing Tm), chunk_state (the state entering each chunk, in
 *   hs), chunk_out (o, and dvi = P^T do into ckpt), chunk_dstate (sequential over chunks:
 *   dS leaving each chunk into dck, dvnew, dh0), chunk_bwdv (du2 = Tm^T dvnew, dv,
 *   vt = v - gamma S0^T k), chunk_bwd (dq, dk, dbeta, dg of every chunk in parallel),
 *   bwd_post (sum over the value heads of a key head, chain rules of beta and l2norm).
 * The chunk is the largest power of two <= min(chunk_size, 64) whose tiles fit in shared
 * memory (the result does not depend on it beyond rounding). NO_CHUNK_FIT (positive, not
 * an error code) when none fits:
 * the caller falls back to the recurrent backward.
 */
#define NO_CHUNK_FIT 1
static int vk_backward_chunk(vkctx *c, const kla_problem *p, const void *q, const void *kk,
                             const void *v, const void *g, const void *a, const void *h0,
                             const void *dout, const void *dht, void *o, void *ht, void *dq,
                             void *dk, void *dv, void *dg, void *da, void *dh0, const extb *ext)
{
    const uint64_t shm = c->props.limits.maxComputeSharedMemorySize;
    uint32_t C = 64;
    while (C > (uint32_t)p->chunk && C > 1) C /= 2;
    for (;; C /= 2) {
        /* chunk_prep, chunk_out as in the forward */
        const uint64_t cp = C <= 16 ? 16 : C <= 32 ? 32 : 64, cvb = 4096 / cp;
        const uint64_t prep = 4ull * (cp * (cp + 4) + 16 * (cvb + 4) + (cp > 16 ? (cp / 16 - 1) * 256 : 1) + 3 * cp);
        const uint64_t out = 4ull * (cp * (cp + 4) + 32 * (cp + 4) + 16 * (cvb + 4) + cp);
        /* chunk_bwdv and chunk_bwd (their shared declarations): TR x TC register tiles,
         * NCG = 256 / (C / TR) column groups, K- and V-wide slab rows of TC * NCG + 4 */
        const uint64_t TR = C < 4 ? C : 4, NCG = 256 / (C / TR), CP = C + 1ull;
        const uint64_t VW = (p->V + NCG - 1) / NCG * NCG, KW = (p->K + NCG - 1) / NCG * NCG;
        const uint64_t KBV = p->V > 256 ? 4 : 16, KB = C < 8 ? C : 8;
        const uint64_t bwdv = 4ull * (C * (KBV + 1) + KBV * (VW + 4) + 2ull * C * NCG);
        uint64_t u = 4ull * C * 17ull; /* Gram slabs, C x C matrices, dq/dk slabs: a union */
        if (u < 2ull * C * CP) u = 2ull * C * CP;
        if (u < C * CP + 3ull * C * (KB + 1) + 2ull * KB * (KW + 4)) u = C * CP + 3ull * C * (KB + 1) + 2ull * KB * (KW + 4);
        const uint64_t bwd = 4ull * (u + 2ull * C * NCG + C * (C / TR) + 8ull * C + 256);
        if (prep <= shm && out <= shm && bwd <= shm && bwdv <= shm) break;
        if (C <= 4) return NO_CHUNK_FIT;
    }
    /* chunk_state and chunk_dstate: the same tiling */
    uint32_t vb = 2, tt = 1;
    const uint32_t swg = cstate_fit(c, p->K, p->V, C, &vb, &tt);
    if (!swg) return NO_CHUNK_FIT;
    plan P;
    int r = make_plan(c, p, 0, C, &P);
    if (r) {
        free(P.offs);
        return r;
    }
    call k = { .c = c };
    take_ext(&k, ext);
    reset_bindings(c);
    const VkDeviceSize f = 4, nv = (VkDeviceSize)(P.total * P.HV * P.V) * f;
    const VkDeviceSize nst = (VkDeviceSize)(P.N * P.HV * P.K * P.V) * f;
    const VkDeviceSize ns = (VkDeviceSize)(P.total * P.HV) * f;
    const VkDeviceSize nq = (VkDeviceSize)(P.total * P.H * P.K) * f;
    const VkDeviceSize nkv = (VkDeviceSize)(P.total * P.HV * P.K) * f;
    const VkDeviceSize nch = (VkDeviceSize)P.nseg * P.HV * P.K * P.V * f;
    P.pc.nvb = 1;
    P.pc.nchunk = (int32_t)P.nseg;
    /* chunk_state and chunk_dstate in windows of chunks on a loop-capped device (the
     * state carried in ht, its gradient in dh0) */
    const int64_t wch = window_len(c, P.K + 4 * C + 64, 1, P.maxseg);
    P.pc.flags |= (g ? F_G : 0) | (h0 ? F_H0 : 0) | F_HT | (dht ? F_DHT : 0) | (dh0 || wch ? F_DH0 : 0) |
                  (dg ? F_DG : 0) | F_TM | F_DVI;
    if (P.nseg > c->props.limits.maxComputeWorkGroupCount[0]) {
        r = KLA_ENOMEM;
        goto out;
    }
    if ((r = bind_prep(&k, &P, q, kk, a)) || (r = upload(&k, B_V, v, nv)) ||
        (r = upload(&k, B_G, g, g ? ns : 0)) || (r = upload(&k, B_H0, h0, h0 ? nst : 0)) ||
        (r = upload(&k, B_DO, dout, nv)) || (r = upload(&k, B_DHT, dht, dht ? nst : 0)) ||
        (r = need(&k, B_O, nv)) || (r = need(&k, B_HT, nst)) || (r = need(&k, B_W, nkv)) ||
        (r = need(&k, B_U, nv)) || (r = need(&k, B_VN, nv)) || (r = need(&k, B_HS, nch)) ||
        (r = need(&k, B_GC, ns)) || (r = need(&k, B_SCR, (VkDeviceSize)P.nseg * P.HV * C * C * f)) ||
        (r = need(&k, B_CKPT, 2 * nv)) || (r = need(&k, B_DCK, nch)) || (r = need(&k, B_DQP, nkv)) ||
        (r = need(&k, B_DKP, nkv)) || (r = need(&k, B_DSP, 2 * ns)) || (r = need(&k, B_DV, nv)) ||
        (r = need(&k, B_DQ, nq)) || (r = need(&k, B_DK, nq)) || (r = need(&k, B_DG, dg ? ns : 0)) ||
        (r = need(&k, B_DA, ns)) || (r = need(&k, B_DH0, dh0 || wch ? nst : 0)))
        goto out;
    download(&k, B_O, o, nv);
    download(&k, B_HT, ht, nst);
    download(&k, B_DQ, dq, nq);
    download(&k, B_DK, dk, nq);
    download(&k, B_DV, dv, nv);
    download(&k, B_DG, dg, ns);
    download(&k, B_DA, da, ns);
    download(&k, B_DH0, dh0, nst);
    const uint32_t K = (uint32_t)P.K, V = (uint32_t)P.V, HV = (uint32_t)P.HV;
    if ((r = begin(&k))) goto out;
    for (int pass = 0; pass < c->passes; pass++) {
        pass_start(&k, pass, c->passes);
        if ((r = run_prep(&k, &P)) ||
            (r = dispatch(&k, get_pipe(c, SH_CHUNK_PREP, 256, K, V, C, 0), &P.pc, (uint64_t)P.nseg, HV, 1)) ||
            (r = dispatch_seq(&k, get_pipe(c, SH_CHUNK_STATE, swg, K, V, C, tt), &P.pc, (P.V + vb - 1) / vb, HV,
                              (uint32_t)P.N, wch, P.maxseg, 0)) ||
            (r = dispatch(&k, get_pipe(c, SH_CHUNK_OUT, 256, K, V, C, 0), &P.pc, (uint64_t)P.nseg, HV, 1)) ||
            (r = dispatch_seq(&k, get_pipe(c, SH_CHUNK_DSTATE, swg, K, V, C, tt), &P.pc, (P.V + vb - 1) / vb, HV,
                              (uint32_t)P.N, wch, P.maxseg, 1)) ||
            (r = dispatch(&k, get_pipe(c, SH_CHUNK_BWDV, 256, K, V, C, 0), &P.pc, (uint64_t)P.nseg, HV, 1)) ||
            (r = dispatch(&k, get_pipe(c, SH_CHUNK_BWD, 256, K, V, C, 0), &P.pc, (uint64_t)P.nseg, HV, 1)) ||
            (r = dispatch(&k, get_pipe(c, SH_POST, 64, K, 0, 0, 0), &P.pc, (uint64_t)(P.total * P.H), 1, 1)))
            goto out;
    }
    r = finish(&k);
out:
    free(P.offs);
    return abandon(&k, r);
}

static int vk_backward(void *state, const kla_problem *p, kla_io *x)
{
    vkctx *c = state;
    const void *q = x->q, *kk = x->k, *v = x->v, *g = x->g, *a = x->a, *h0 = x->h0, *dout = x->dout;
    const void *dht = x->dht;
    void *o = x->o, *ht = x->ht, *dq = x->dq, *dk = x->dk, *dv = x->dv, *dg = x->dg, *da = x->da;
    void *dh0 = x->dh0;
    extb ext;
    ext_from(x, &ext);
    if (x->algo != KLA_ALGO_RECURRENT) {
        x->algo = KLA_ALGO_CHUNK;
        int r = vk_backward_chunk(c, p, q, kk, v, g, a, h0, dout, dht, o, ht, dq, dk, dv, dg, da, dh0, &ext);
        if (r != NO_CHUNK_FIT) return r;
    }
    x->algo = KLA_ALGO_RECURRENT;
    /* BPTT from checkpoints: KLA_ALGO_RECURRENT, or chunk tiles that do not fit */
    plan P;
    int r = make_plan(c, p, 1, 16, &P);
    if (r) {
        free(P.offs);
        return r;
    }
    call k = { .c = c };
    take_ext(&k, &ext);
    reset_bindings(c);
    const VkDeviceSize f = 4, nv = (VkDeviceSize)(P.total * P.HV * P.V) * f;
    const VkDeviceSize nst = (VkDeviceSize)(P.N * P.HV * P.K * P.V) * f;
    const VkDeviceSize ns = (VkDeviceSize)(P.total * P.HV) * f;
    const VkDeviceSize nq = (VkDeviceSize)(P.total * P.H * P.K) * f;
    const VkDeviceSize npart = (VkDeviceSize)(P.total * P.HV) * P.nvb;
    /* workers of rec_bwd per (V block, head): enough workgroups to fill a large GPU, as
     * many replay slices of scratch */
    const VkDeviceSize slice = (VkDeviceSize)P.HV * P.nvb * P.ck * (VkDeviceSize)P.K * P.bwg * f;
    uint32_t nw = (uint32_t)(4096 / (P.HV * P.nvb));
    if (nw < 1) nw = 1;
    if (nw > P.nseg) nw = P.nseg > 0 ? (uint32_t)P.nseg : 1;
    while (nw > 1 && (VkDeviceSize)nw * slice > c->props.limits.maxStorageBufferRange) nw /= 2;
    const VkDeviceSize nscr = nw * slice;
    const VkDeviceSize nck = (VkDeviceSize)P.nseg * P.HV * P.K * P.V * f;
    P.pc.nchunk = (int32_t)P.nseg;
    /* windows on a loop-capped device: tokens for rec_fwd and rec_dstate (dS carried in
     * dh0), segments for rec_bwd (about 8 K iterations a token) */
    const int64_t wtok = window_len(c, 3 * P.K + 8, P.ck, P.maxlen);
    const int64_t per_seg = ((int64_t)P.nseg + nw - 1) / nw; /* segments per worker */
    const int64_t wseg = window_len(c, 8 * P.K * P.ck + 64, 1, per_seg) * nw;
    P.pc.flags |= (g ? F_G : 0) | (h0 ? F_H0 : 0) | F_HT | (dht ? F_DHT : 0) | (dh0 || wtok ? F_DH0 : 0) |
                  (dg ? F_DG : 0);
    if ((r = bind_prep(&k, &P, q, kk, a)) || (r = upload(&k, B_V, v, nv)) ||
        (r = upload(&k, B_G, g, g ? ns : 0)) || (r = upload(&k, B_H0, h0, h0 ? nst : 0)) ||
        (r = upload(&k, B_DO, dout, nv)) || (r = upload(&k, B_DHT, dht, dht ? nst : 0)) ||
        (r = need(&k, B_O, nv)) || (r = need(&k, B_HT, nst)) ||
        (r = need(&k, B_CKPT, nck)) || (r = need(&k, B_DCK, nck)) || (r = need(&k, B_SCR, nscr)) ||
        (r = need(&k, B_DQP, npart * P.K * f)) || (r = need(&k, B_DKP, npart * P.K * f)) ||
        (r = need(&k, B_DSP, npart * 2 * f)) || (r = need(&k, B_DV, nv)) || (r = need(&k, B_DQ, nq)) ||
        (r = need(&k, B_DK, nq)) || (r = need(&k, B_DG, dg ? ns : 0)) || (r = need(&k, B_DA, ns)) ||
        (r = need(&k, B_DH0, dh0 || wtok ? nst : 0)))
        goto out;
    download(&k, B_O, o, nv);
    download(&k, B_HT, ht, nst);
    download(&k, B_DQ, dq, nq);
    download(&k, B_DK, dk, nq);
    download(&k, B_DV, dv, nv);
    download(&k, B_DG, dg, ns);
    download(&k, B_DA, da, ns);
    download(&k, B_DH0, dh0, nst);
    if ((r = begin(&k))) goto out;
    for (int pass = 0; pass < c->passes; pass++) {
        pass_start(&k, pass, c->passes);
        if ((r = run_prep(&k, &P))) goto out;
        /* the forward, saving the state entering every segment of CK tokens */
        pconst fpc = P.pc;
        fpc.flags |= F_CKPT;
        uint32_t tb = 8;
        while (tb > 1 && 4ull * (2ull * tb * P.K + 2 * tb) > c->props.limits.maxComputeSharedMemorySize) tb /= 2;
        const uint32_t fnvb = (uint32_t)((P.V + P.wg - 1) / P.wg);
        if ((r = dispatch_seq(&k, get_pipe(c, SH_REC_FWD, P.wg, (uint32_t)P.K, (uint32_t)P.V, P.ck, tb), &fpc,
                              fnvb, (uint32_t)P.HV, (uint32_t)P.N, wtok, P.maxlen, 0)) ||
            (r = dispatch_seq(&k, get_pipe(c, SH_REC_DSTATE, P.wg, (uint32_t)P.K, (uint32_t)P.V, P.ck, tb), &P.pc,
                              fnvb, (uint32_t)P.HV, (uint32_t)P.N, wtok, P.maxlen, 1)) ||
            (r = dispatch_seq(&k, get_pipe(c, SH_REC_BWD, P.bwg, (uint32_t)P.K, (uint32_t)P.V, P.ck, 0), &P.pc,
                              P.nvb, (uint32_t)P.HV, nw, wseg, P.nseg, 0)) ||
            (r = dispatch(&k, get_pipe(c, SH_POST, 64, (uint32_t)P.K, 0, 0, 0), &P.pc,
                          (uint64_t)(P.total * P.H), 1, 1)))
            goto out;
    }
    r = finish(&k);
out:
    free(P.offs);
    return abandon(&k, r);
}

static int vk_gpu_time(void *state, double *ms, const char **names, int max)
{
    const vkctx *c = state;
    if (c->gpu_ms < 0 || max < 1) return 0;
    ms[0] = c->gpu_ms;
    if (names) names[0] = "all";
    int n = 1;
    for (int i = 0; i < c->nsplit && n < max; i++, n++) {
        ms[n] = c->split_ms[i];
        if (names) names[n] = c->split_name[i];
    }
    return n;
}

const kla_backend kla_backend_vulkan = {
    .name = "vulkan", .real = KLA_F32, .usable = vk_usable, .open = vk_open, .close = vk_close,
    .describe = vk_describe,
    .forward = vk_forward, .backward = vk_backward, .decode = vk_decode, .gpu_time = vk_gpu_time,
    .mem_new = vk_mem_new, .mem_free = vk_mem_free, .mem_copy = vk_mem_copy,
    .decode_state = vk_decode_state, .open_external = vk_open_external, .mem_wrap = vk_mem_wrap,
    .mem_handle = vk_mem_handle, .dev16 = 1,
};
