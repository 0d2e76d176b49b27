"""The classical tier: TF-IDF voters (tfidf_lr, tfidf_svm) and the sentence-embedding voter (minilm)."""
