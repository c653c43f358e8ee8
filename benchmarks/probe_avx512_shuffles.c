// Throughput of the AVX-512 byte shuffles the sparse 4-bit kernels lean on, on this CPU: vpexpandb and
// vpcompressb (64 bytes under a 64-bit mask), against vpdpbusd and vpermb, four independent chains per loop,
// thread CPU time. Not part of the package; the numbers quoted in docs/results.md ("Sparse + quantized
// weights") came from it on an AMD EPYC Zen 4:
//     gcc -O2 -mavx512f -mavx512bw -mavx512vbmi -mavx512vbmi2 -mavx512vnni \
//         -o /tmp/probe_avx512_shuffles benchmarks/probe_avx512_shuffles.c && /tmp/probe_avx512_shuffles
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  const long N=200000000;
  __m512i a=_mm512_set1_epi8(3), b=_mm512_set1_epi8(5), c=_mm512_set1_epi8(7), d=_mm512_set1_epi8(9);
  __m512i acc0=_mm512_setzero_si512(), acc1=acc0, acc2=acc0, acc3=acc0;
  uint64_t k=0x5555aaaa5555aaaaull;
  double t=now();
  for(long i=0;i<N;i++){
    __mmask64 m=k^i;
    acc0=_mm512_add_epi8(acc0,_mm512_maskz_expand_epi8(m,a));
    acc1=_mm512_add_epi8(acc1,_mm512_maskz_expand_epi8(m,b));
    acc2=_mm512_add_epi8(acc2,_mm512_maskz_expand_epi8(m,c));
    acc3=_mm512_add_epi8(acc3,_mm512_maskz_expand_epi8(m,d));
  }
  double e=now()-t;
  printf("expand: %.3f ns per expand\n", e/N/4*1e9);
  t=now();
  for(long i=0;i<N;i++){
    __mmask64 m=k^i;
    acc0=_mm512_add_epi8(acc0,_mm512_maskz_compress_epi8(m,a));
    acc1=_mm512_add_epi8(acc1,_mm512_maskz_compress_epi8(m,b));
    acc2=_mm512_add_epi8(acc2,_mm512_maskz_compress_epi8(m,c));
    acc3=_mm512_add_epi8(acc3,_mm512_maskz_compress_epi8(m,d));
  }
  e=now()-t;
  printf("compress: %.3f ns per compress\n", e/N/4*1e9);
  t=now();
  for(long i=0;i<N;i++){
    acc0=_mm512_dpbusd_epi32(acc0,a,b);
    acc1=_mm512_dpbusd_epi32(acc1,a,c);
    acc2=_mm512_dpbusd_epi32(acc2,a,d);
    acc3=_mm512_dpbusd_epi32(acc3,b,c);
  }
  e=now()-t;
  printf("dpbusd: %.3f ns per op\n", e/N/4*1e9);
  // vpermb based alternative
  __m512i idx=_mm512_set1_epi8(1);
  t=now();
  for(long i=0;i<N;i++){
    idx=_mm512_add_epi8(idx,a);
    acc0=_mm512_add_epi8(acc0,_mm512_permutexvar_epi8(idx,a));
    acc1=_mm512_add_epi8(acc1,_mm512_permutexvar_epi8(idx,b));
    acc2=_mm512_add_epi8(acc2,_mm512_permutexvar_epi8(idx,c));
    acc3=_mm512_add_epi8(acc3,_mm512_permutexvar_epi8(idx,d));
  }
  e=now()-t;
  printf("vpermb: %.3f ns per op\n", e/N/4*1e9);
  __m512i s=_mm512_add_epi8(_mm512_add_epi8(acc0,acc1),_mm512_add_epi8(acc2,acc3));
  printf("%d\n", _mm_cvtsi128_si32(_mm512_castsi512_si128(s)));
}
